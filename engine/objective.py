"""The iBOT objective: cls self-distillation over cross-view pairs plus masked-patch self-distillation.

    L = lambda_cls * L_cls + lambda_patch * L_patch                                         (iBOT eq. 1-3)
    L_cls   = 1 / (G (G + L) - G) * sum_{q < G} sum_{v != q} mean_b H(P_t^cls[q, b], P_s^cls[v, b])
    L_patch = 1 / (G B) * sum_{global crops c} sum_{i in M_c} H(P_t^patch[c, i], P_s^patch[c, i]) / max(1, |M_c|)

with P_t = softmax((t - centre) / tau_t) in fp32 and log P_s = log_softmax(s / tau_s), H(p, q) = -sum_k p_k log q_k.
Every softmax goes through `ibot_kernels.centered_softmax_cross_entropy` (Triton on GPU, the PyTorch reference
elsewhere). Centres are two buffers (cls, patch) updated after the loss with all-reduced batch statistics; the
Sinkhorn-Knopp alternative (DINOv2) replaces them behind `loss.centering=sinkhorn`.

Shapes: G global views, L local views, B images per view, K prototypes, M masked tokens in `mask.nonzero()` order,
V = G + L. Tensors are view-major: all B images of view 0, then view 1, ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ibot_kernels import centered_softmax_cross_entropy

AllReduce = Callable[[Tensor], Tensor]


class IBOTLoss(NamedTuple):
    total: Tensor
    cls: Tensor
    patch: Tensor
    koleo: Tensor | None = None  # the unweighted KoLeo term when loss.koleo_weight > 0


@functools.cache
def _cross_view_pairs(num_global: int, num_views: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row indices (teacher rows, student rows) of every pair (q, v), q < G, v != q, each over its B images.

    Cached per shape and device, and built by device ops (no tensor from Python data, no host copy)."""
    # Pair j of teacher view q is student view j + (j >= q): every view but q, in order.
    q_idx = torch.arange(num_global, device=device).repeat_interleave(num_views - 1)
    j = torch.arange(num_views - 1, device=device).repeat(num_global)
    v_idx = j + (j >= q_idx).long()
    b = torch.arange(batch, device=device)
    teacher_rows = (q_idx[:, None] * batch + b).reshape(-1)
    student_rows = (v_idx[:, None] * batch + b).reshape(-1)
    return teacher_rows, student_rows


def masked_token_weights(mask: Tensor, num_masked: int) -> Tensor:
    """[M] weight 1 / (masked count of the token's crop) for the tokens of `mask.nonzero()` order, no host sync."""
    counts = mask.flatten(1).sum(1)
    crop_of_token = torch.repeat_interleave(
        torch.arange(mask.shape[0], device=mask.device), counts, output_size=num_masked
    )
    return 1.0 / counts.clamp(min=1).float()[crop_of_token]


def ibot_loss(
    student_cls: Tensor,
    teacher_cls: Tensor,
    student_patch: Tensor,
    teacher_patch: Tensor,
    mask: Tensor,
    cls_center: Tensor,
    patch_center: Tensor,
    teacher_temp: float,
    patch_teacher_temp: float,
    student_temp: float = 0.1,
    *,
    num_global: int = 2,
    lambda_cls: float = 1.0,
    lambda_patch: float = 1.0,
) -> IBOTLoss:
    """iBOT loss of one batch (scalars, fp32).

    Args:
        student_cls: [(G + L) * B, K] student cls logits, view-major (masked global views first, then locals).
        teacher_cls: [G * B, K] teacher cls logits of the unmasked global views.
        student_patch: [M, K] student logits of the masked global tokens, `mask.nonzero()` order.
        teacher_patch: [M, K] teacher logits of the same tokens.
        mask: [G * B, h, w] bool; G * B = mask.shape[0].
        cls_center, patch_center: [K] fp32 centres (use zeros with Sinkhorn targets; see `sinkhorn_log_targets`).
        teacher_temp, patch_teacher_temp, student_temp: temperatures.
        num_global: G (2 in iBOT).
    """
    num_crops = mask.shape[0]
    if num_crops % num_global:
        raise ValueError(f"mask has {num_crops} crops, not a multiple of num_global={num_global}")
    batch = num_crops // num_global
    if teacher_cls.shape[0] != num_crops or student_cls.shape[0] % batch:
        raise ValueError(
            f"teacher_cls {tuple(teacher_cls.shape)} / student_cls {tuple(student_cls.shape)} do not match "
            f"mask {tuple(mask.shape)} with {num_global} global views"
        )
    num_views = student_cls.shape[0] // batch
    num_masked = student_patch.shape[0]
    if teacher_patch.shape[0] != num_masked:
        raise ValueError(f"student_patch has {num_masked} rows, teacher_patch {teacher_patch.shape[0]}")

    teacher_rows, student_rows = _cross_view_pairs(num_global, num_views, batch, student_cls.device)
    ce_cls = centered_softmax_cross_entropy(
        student_cls.index_select(0, student_rows),
        teacher_cls.index_select(0, teacher_rows),
        cls_center,
        student_temp,
        teacher_temp,
    )
    # Mean over pairs of the per-pair mean over B == mean over all pair rows (every pair has B rows).
    loss_cls = ce_cls.mean() if ce_cls.numel() else ce_cls.sum()

    ce_patch = centered_softmax_cross_entropy(
        student_patch, teacher_patch, patch_center, student_temp, patch_teacher_temp
    )
    # Per crop: sum over its masked tokens / max(1, count); then mean over all G*B crops, unmasked ones adding 0.
    loss_patch = (ce_patch * masked_token_weights(mask, num_masked)).sum() / num_crops

    total = lambda_cls * loss_cls + lambda_patch * loss_patch
    return IBOTLoss(total, loss_cls, loss_patch)


# ----------------------------------------------------------------------------------------------------------------
# KoLeo


def koleo_loss(cls_tokens: Tensor, num_global: int, *, all_gather: Callable[[Tensor], Tensor] | None = None,
               rank: int = 0, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser (DINOv2, after Sablayrolles et al. 2019) on the student's global cls tokens, in fp32:

        L_koleo = sum_{global views v} -1/n sum_{i in v} log(||x_i - x_nn(i)|| + eps),   x = token / ||token||

    where nn(i) is the most cosine-similar other image of the same view in the *global* batch (n = B x world
    size): rows of the other ranks come through `all_gather` (differentiable, e.g.
    `ibot_engine.distributed.all_gather_with_grad`), and each rank returns the mean over its own rows. The trainer's
    all-reduce mean of the logged value is then the global batch's loss, and DDP / FSDP2's gradient averaging gives
    exactly its gradient: the loss does not depend on how the batch is split over ranks. The sum over global views
    (not the mean) is DINOv2's. Numerically safe forms: fp32 before normalising; the distance is the plain L2 norm
    (DINOv2's `PairwiseDistance` adds eps inside the difference, which gives a 3e5 gradient at a duplicate pair;
    ours gives 0 there and a bounded loss of -log(eps)); a global batch of one image has no neighbour: loss 0.

    Args:
        cls_tokens: [G*B, D] backbone cls tokens of the G global views, view-major (this rank's B images each).
        num_global: G.
        all_gather: concatenates every rank's [B, ...] rows along dim 0 (None: one process).
        rank: this rank's index (its rows sit at [rank*B, (rank+1)*B) of the gathered tensor).
    """
    x = F.normalize(cls_tokens.float(), dim=-1, eps=eps)
    batch = x.shape[0] // num_global
    x_VBD = x.reshape(num_global, batch, -1)
    everyone_VND = x_VBD if all_gather is None else all_gather(x_VBD.transpose(0, 1)).transpose(0, 1)
    if everyone_VND.shape[1] < 2:
        return x.sum() * 0.0
    with torch.no_grad():
        sim_VBN = torch.bmm(x_VBD, everyone_VND.transpose(1, 2))
        sim_VBN.diagonal(offset=rank * batch, dim1=1, dim2=2).fill_(-float("inf"))  # never your own neighbour
        nearest_VB = sim_VBN.argmax(dim=2)
    neighbour_VBD = torch.gather(everyone_VND, 1, nearest_VB[..., None].expand_as(x_VBD))
    distance_VB = torch.linalg.vector_norm(x_VBD - neighbour_VBD, dim=-1)
    return -torch.log(distance_VB + eps).mean(dim=1).sum()


# ----------------------------------------------------------------------------------------------------------------
# Centring


@torch.no_grad()
def update_centers_(
    cls_center: Tensor,
    patch_center: Tensor,
    teacher_cls: Tensor,
    patch_sum: Tensor,
    patch_count: int,
    momentum: float,
    all_reduce: AllReduce | None = None,
) -> None:
    """EMA of the centres towards this step's global batch means (call after the loss used the old ones).

    c  <- m c  + (1 - m) * allreduce(sum_rows teacher_cls) / allreduce(rows)
    c2 <- m c2 + (1 - m) * allreduce(patch_sum) / allreduce(patch_count)

    `patch_sum` sums the teacher patch logits that define the patch centre (all tokens of the global crops for the
    official rule, masked tokens only for DINOv2's); a global count of 0 leaves c2 unchanged. One collective.
    """
    K = cls_center.shape[0]
    # The two counts are host numbers: written as kernel arguments (a tensor of a Python list is a host copy).
    counts = cls_center.new_empty(2, dtype=torch.float32)
    counts[0].fill_(teacher_cls.shape[0])
    counts[1].fill_(patch_count)
    stats = torch.cat([teacher_cls.sum(0, dtype=torch.float32), patch_sum.float(), counts])
    if all_reduce is not None:
        stats = all_reduce(stats)
    cls_mean = stats[:K] / stats[2 * K]
    patch_count_all = stats[2 * K + 1]
    patch_mean = stats[K : 2 * K] / patch_count_all.clamp(min=1)
    cls_center.mul_(momentum).add_(cls_mean, alpha=1 - momentum)
    new_patch = patch_center * momentum + patch_mean * (1 - momentum)
    patch_center.copy_(torch.where(patch_count_all > 0, new_patch, patch_center))  # no host sync on the count


@torch.no_grad()
def sinkhorn_log_targets(
    teacher_logits: Tensor, teacher_temp: float, num_iters: int = 3, all_reduce: AllReduce | None = None
) -> Tensor:
    """Sinkhorn-Knopp teacher targets (DINOv2), returned as log-probabilities [n, K] in fp32.

    Feeding them to the centred cross-entropy with centre 0 and temperature 1 gives exactly these targets,
    since softmax(log q) = q for a distribution q; so the softmax work still goes through the kernel.
    As in DINOv2 there is no max-subtraction before exp: logits are bounded cosines (times g).
    """
    Q = torch.exp(teacher_logits.float() / teacher_temp).t()  # [K, n]
    n_local = Q.new_full((1,), Q.shape[1])  # a host number as a kernel argument: no host-to-device copy
    n_total = all_reduce(n_local.clone()) if all_reduce is not None else n_local
    total = Q.sum().reshape(1)
    Q /= all_reduce(total) if all_reduce is not None else total
    K = Q.shape[0]
    for _ in range(num_iters):
        rows = Q.sum(dim=1, keepdim=True)
        Q /= (all_reduce(rows) if all_reduce is not None else rows) * K
        Q /= Q.sum(dim=0, keepdim=True).clamp(min=1e-30) * n_total
    Q *= n_total
    return Q.t().clamp(min=1e-30).log()
