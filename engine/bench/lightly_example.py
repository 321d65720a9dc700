"""lightly's iBOT example (`examples/pytorch/ibot.py` of lightly-ai/lightly), built in one place: the speed peer of
`ibot bench --compare lightly` (lightly_peer.py), the learning peer of `python -m ibot_benchmarks.peer_learning`
and the whole-step parity test (tests/test_parity_lightly.py) all use it. The only module that imports lightly.

Read for facts at lightly-ai/lightly e8d317fc (2026-08-21): the example is unchanged since it was added (3995c598,
"Add iBOT to Docs with Example") but for its formatting (d673713d); the API it calls is lightly 1.6.0's, the
installed version. What the example does, and this module with it:
* model (`LightlyExample`): timm's `vit_small_patch16_224(pos_embed="learn", dynamic_img_size=True,
  init_values=1e-5)` wrapped in `MaskedVisionTransformerTIMM(antialias=False, pos_embed_initialization="skip")` as
  the teacher; the student a deep copy of it with uniform drop path 0.1 (`update_drop_path_rate`); the teacher
  frozen and in eval mode.
* heads: one `DINOProjectionHead` per side for both the cls and the patch tokens; the student's with
  `norm_last_layer=False`, the teacher's with the default (its last layer's weight-norm gain frozen at 1).
  The teacher head is drawn on its own, not copied from the student head: the example builds a second head
  (`self.teacher_head = projection_head()`) and never loads the student's weights into it. The official iBOT and
  our default (`model.teacher_head=copy`) copy them; both peers follow the example, which is what they stand for
  (`model.teacher_head=independent` makes ours draw it separately too).
* losses: `DINOLoss` on the cls tokens + `IBOTPatchLoss` on the masked global tokens, K = 8192, teacher temperature
  0.07 at construction; `random_block_mask` block masks; `IBOTTransform` views.
* schedules (`lightly_schedules`): teacher temperature linear 0.04 -> 0.07 over 30 of its 50 epochs, weight decay
  cosine 0.04 -> 0.4, EMA momentum cosine 0.992 -> 1, all per step; AdamW at a constant 1e-3 over every parameter
  (`example_optimizer`).
* one step (`lightly_example_step`), in the example's order: teacher, student, losses, backward,
  `cancel_last_layer_gradients`, weight decay, AdamW step, EMA of backbone and head (`update_momentum`).

Changed only in size (`LightlyExample`'s arguments): our arch, patch and image size, K and head widths. The ViT is
`timm.create_model(timm_name(arch, patch, size), patch_size=..., img_size=..., num_classes=0)`; `num_classes=0`
leaves out the 1000-class classifier of the example's ViT, which `encode` never calls and AdamW skips (it gets no
gradient). lightly and timm are imported where they are used, so the engine imports this module without the bench
extra; `require_lightly()` says what is missing.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ibot_engine.bench.timing import BenchSetupError
from ibot_engine.model.released import from_timm, timm_name
from ibot_engine.train.health import HEALTH_KEYS, health_metrics

if TYPE_CHECKING:
    from ibot_engine.model.ibot import IBOT

TEACHER_TEMP = 0.07  # DINOLoss / IBOTPatchLoss at construction, and the end of the warm-up below
LR = 1e-3


def require_lightly() -> None:
    """Raise one clear error when lightly or timm is missing (before any benchmark work)."""
    missing = []
    for name in ("lightly", "timm"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise BenchSetupError(f"--compare lightly needs {' and '.join(missing)}: pip install 'ibot-engine[bench]'")


def peer_versions() -> dict[str, str]:
    """The lightly and timm versions, for reports."""
    import lightly
    import timm

    return {"lightly": lightly.__version__, "timm": timm.__version__}


class LightlyExample(torch.nn.Module):
    """The example's `IBOT` module; the defaults are the example's own sizes (ViT-S/16 at 224 px, K = 8192).

    Args:
        arch: our `model.arch` (timm's ViT of that width and depth, `timm_name`).
        patch_size: ViT patch size.
        img_size: global crop size (the learned position embedding is resampled for other crop sizes).
        out_dim: K, the heads' output width.
        hidden_dim: the heads' hidden width.
        bottleneck_dim: the heads' bottleneck width.
        drop_path: the student's uniform drop-path rate (0: none).
    """

    def __init__(self, *, arch: str = "vit_small", patch_size: int = 16, img_size: int = 224, out_dim: int = 8192,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, drop_path: float = 0.1) -> None:
        super().__init__()
        import timm
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate

        self.timm_name = timm_name(arch, patch_size, img_size)
        vit = timm.create_model(self.timm_name, pretrained=False, patch_size=patch_size, img_size=img_size,
                                num_classes=0, pos_embed="learn", dynamic_img_size=True, init_values=1e-5)
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        if drop_path > 0:
            update_drop_path_rate(self.student_backbone.vit, drop_path_rate=drop_path, mode="uniform")
        embed_dim = vit.embed_dim
        self.student_head = DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, out_dim, norm_last_layer=False)
        self.teacher_head = DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, out_dim)
        for module in (self.teacher_backbone, self.teacher_head):
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> LightlyExample:
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        return self


def example_losses(out_dim: int) -> tuple[Any, Any]:
    """The example's `DINOLoss` and `IBOTPatchLoss` (each keeps its own centre)."""
    from lightly.loss import DINOLoss, IBOTPatchLoss

    return DINOLoss(output_dim=out_dim, teacher_temp=TEACHER_TEMP), IBOTPatchLoss(output_dim=out_dim,
                                                                                  teacher_temp=TEACHER_TEMP)


def example_optimizer(model: LightlyExample) -> torch.optim.Optimizer:
    """The example's AdamW: every parameter (the frozen teacher's get no gradient and are skipped), all decayed."""
    return torch.optim.AdamW(model.parameters(), lr=LR)


def example_transform(global_size: int, local_size: int, num_local: int) -> Any:
    """The example's `IBOTTransform` at these crop sizes: a PIL image -> [2 global views, `num_local` local]."""
    from lightly.transforms.ibot_transform import IBOTTransform

    return IBOTTransform(global_crop_size=global_size, local_crop_size=local_size, n_local_views=num_local)


def block_masks(num_images: int, grid: int, device: torch.device | str | None = None) -> Tensor:
    """The example's `random_block_mask` for `num_images` global views of `grid` x `grid` patches: bool
    [num_images, grid, grid]. Draws from Python's `random`.

    Its smallest block (4 patches) exceeds the masked count of grids under 40 patches (tiny test configs); there the
    smallest block is 1 patch.
    """
    from lightly.models.utils import random_block_mask

    smallest = 1 if grid * grid * 0.1 < 4 else 4
    return random_block_mask(size=(num_images, grid, grid), device=device, min_num_masks_per_block=smallest)


def lightly_schedules(step: int, total_steps: int, warmup_steps: int) -> dict[str, float]:
    """The example's per-step values: teacher temperature, weight decay, EMA momentum."""
    from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule

    return {
        "teacher_temp": linear_warmup_schedule(step=step, warmup_steps=warmup_steps, start_value=0.04,
                                               end_value=TEACHER_TEMP),
        "weight_decay": cosine_schedule(step=step, max_steps=total_steps, start_value=0.04, end_value=0.4),
        "momentum": cosine_schedule(step=step, max_steps=total_steps, start_value=0.992, end_value=1.0),
    }


def lightly_example_step(peer: LightlyExample, optimizer: torch.optim.Optimizer, dino: Any, ibot_patch: Any,
                         global_views: Tensor, local_views: Tensor | None, block_mask: Tensor, *, step: int,
                         total_steps: int, warmup_steps: int, num_global: int = 2,
                         amp_dtype: torch.dtype | None = None, grads: bool = False,
                         health: bool = False) -> dict[str, Any]:
    """One iteration of the example's loop body, in its order: teacher, student, `DINOLoss` + `IBOTPatchLoss`
    (each updates its centre after computing the loss), backward, weight decay schedule, AdamW step, EMA.

    Args:
        peer: the model.
        optimizer: its optimizer (`example_optimizer`, or another over the student's parameters).
        dino: the `DINOLoss` of `example_losses`.
        ibot_patch: the `IBOTPatchLoss` of `example_losses`.
        global_views: [G*B, 3, H, W], view-major.
        local_views: [L*B, 3, h, w], view-major, or None (no local crops).
        block_mask: bool [G*B, H/p, W/p], True = masked.
        step: the step index the schedules are read at.
        total_steps: the steps the schedules span.
        warmup_steps: the teacher temperature's warm-up.
        num_global: G (the example has 2).
        amp_dtype: autocast dtype of the forward and the losses (the speed peer's best form); None: fp32, as the
            example.
        grads: also return a copy of the student gradients the optimizer applied (keyed "backbone.<name>" /
            "head.<name>").
        health: also return our training-health numbers (`ibot_engine.train.health`, the same formulas as ours).

    Returns:
        `loss_cls` and `loss_patch` (detached), with `grads` / `health` when asked.
    """
    from lightly.models.utils import update_momentum

    s = lightly_schedules(step, total_steps, warmup_steps)
    num_views = num_global + (0 if local_views is None else local_views.shape[0] * num_global // global_views.shape[0])
    mask = torch.cat([block_mask.new_zeros(block_mask.shape[0], 1), block_mask.flatten(1)], dim=1)  # + cls column
    with torch.autocast(global_views.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        with torch.no_grad():
            teacher_features = peer.teacher_backbone.encode(global_views)
            teacher_cls_out = peer.teacher_head(teacher_features[:, 0])
            teacher_masked_out = peer.teacher_head(teacher_features[mask])
        student_global = peer.student_backbone.encode(global_views, mask=mask)
        student_cls_out = peer.student_head(student_global[:, 0])
        student_global_masked_out = peer.student_head(student_global[mask])
        if local_views is not None:
            student_local_cls_out = peer.student_head(peer.student_backbone.encode(local_views)[:, 0])
            student_cls_out = torch.cat([student_cls_out, student_local_cls_out])
        center = dino.center.detach().clone()  # the centre this step's targets use (DINOLoss updates it in the call)
        dino_loss = dino(teacher_out=teacher_cls_out.chunk(num_global), student_out=student_cls_out.chunk(num_views),
                         teacher_temp=s["teacher_temp"])
        ibot_loss = ibot_patch(teacher_out=teacher_masked_out, student_out=student_global_masked_out,
                               mask=block_mask, teacher_temp=s["teacher_temp"])
    (dino_loss + ibot_loss).backward()
    peer.student_head.cancel_last_layer_gradients(0)  # the example's call; freeze_last_layer=-1: a no-op
    for group in optimizer.param_groups:
        if group["weight_decay"] != 0.0:
            group["weight_decay"] = s["weight_decay"]
    out: dict[str, Any] = {"loss_cls": dino_loss.detach(), "loss_patch": ibot_loss.detach()}
    if health:
        with torch.no_grad():
            values = health_metrics(teacher_cls_out, teacher_cls_out[:0], center.flatten(), center.flatten(),
                                    s["teacher_temp"], s["teacher_temp"], student_global[:, 0],
                                    teacher_features[:, 0])
        out["health"] = dict(zip(HEALTH_KEYS, values.tolist(), strict=True))
    if grads:
        out["grads"] = {**{f"backbone.{k}": p.grad.clone() for k, p in peer.student_backbone.named_parameters()},
                        **{f"head.{k}": p.grad.clone() for k, p in peer.student_head.named_parameters()}}
    optimizer.step()
    optimizer.zero_grad()
    update_momentum(peer.student_backbone, peer.teacher_backbone, m=s["momentum"])
    update_momentum(peer.student_head, peer.teacher_head, m=s["momentum"])
    return out


def ours_state_from_lightly(peer: LightlyExample, ours: IBOT) -> dict[str, Tensor]:
    """The peer's weights as our `IBOT` state dict (timm's ViT keys through `from_timm`; the head's `layers.*` is our
    `mlp.*`), with `ours`' centres. The shapes must agree (same sizes on both sides)."""
    state = {}
    for mine, vit in (("student", peer.student_backbone.vit), ("teacher", peer.teacher_backbone.vit)):
        state.update({f"{mine}.backbone.{k}": v.clone() for k, v in from_timm(vit.state_dict()).items()})
    state["student.backbone.mask_token"] = peer.student_backbone.mask_token.detach().reshape(1, -1).clone()
    for mine, head in (("student", peer.student_head), ("teacher", peer.teacher_head)):
        for key, value in head.state_dict().items():
            state[f"{mine}.head.{key.replace('layers.', 'mlp.')}"] = value.clone()
    state["cls_center"] = ours.cls_center.clone()
    state["patch_center"] = ours.patch_center.clone()
    return state
