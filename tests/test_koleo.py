"""KoLeo (`loss.koleo_weight`): the formula, DINOv2's implementation, its safe corners, and ranks that see parts of
the global batch (the loss and every gradient equal one process with the whole batch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ibot_engine.objective import koleo_loss
from tests.helpers import spawn_ranks


def _formula(tokens: torch.Tensor, num_global: int) -> torch.Tensor:
    """sum over views of -mean_i log(min_{j != i} ||x_i - x_j||), x = unit rows: loops, no tricks."""
    total = torch.zeros((), dtype=torch.float64)
    for view in tokens.double().chunk(num_global):
        x = view / view.norm(dim=1, keepdim=True)
        n = x.shape[0]
        terms = [math.log(min(float((x[i] - x[j]).norm()) for j in range(n) if j != i) + 1e-8) for i in range(n)]
        total -= sum(terms) / n
    return total


class _DINOv2KoLeo(torch.nn.Module):
    """DINOv2's KoLeoLoss (dinov2/loss/koleo_loss.py), ported literally: the reference implementation."""

    def __init__(self) -> None:
        super().__init__()
        self.pdist = torch.nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_nns_inner(self, x):
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # the diagonal
        _, indices = torch.max(dots, dim=1)
        return indices

    def forward(self, student_output, eps=1e-8):
        student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
        indices = self.pairwise_nns_inner(student_output)
        distances = self.pdist(student_output, student_output[indices])
        return -torch.log(distances + eps).mean()


def test_koleo_equals_its_formula_and_dinov2():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2 * 12, 16, generator=g)
    ours = koleo_loss(tokens, num_global=2)
    torch.testing.assert_close(ours.double(), _formula(tokens, 2), rtol=1e-5, atol=1e-5)
    dinov2 = sum(_DINOv2KoLeo()(view) for view in tokens.chunk(2))  # ssl_meta_arch: a sum over the global views
    torch.testing.assert_close(ours, dinov2, rtol=1e-5, atol=1e-5)


def test_koleo_gradient_spreads_the_closest_pair_apart():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.1]], requires_grad=True)
    koleo_loss(x, num_global=1).backward()
    # Moving the two close rows apart lowers the loss: the gradient points them towards each other.
    towards = F.normalize(x[1] - x[0], dim=0).detach()
    assert float(x.grad[0] @ towards) > 0 and float(x.grad[1] @ towards) < 0


def test_koleo_is_finite_on_duplicates_in_bf16_and_zero_for_one_image():
    x = torch.randn(6, 8).repeat(2, 1).to(torch.bfloat16).requires_grad_()  # every row twice: distance 0
    loss = koleo_loss(x, num_global=2)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(float(loss)) and torch.isfinite(x.grad).all()
    assert float(koleo_loss(torch.randn(2, 8), num_global=2)) == 0.0  # one image per view: no neighbour


def _koleo_worker(rank: int, world: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    try:
        from ibot_engine.distributed import all_gather_with_grad

        tokens = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))  # [views, global batch, D]
        mine = tokens[:, rank * 4 : (rank + 1) * 4].reshape(-1, 16).clone().requires_grad_()
        loss = koleo_loss(mine, 2, all_gather=all_gather_with_grad, rank=rank)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_koleo_over_two_ranks_equals_one_process_on_the_global_batch(tmp_path):
    spawn_ranks(_koleo_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    tokens = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    whole = koleo_loss(tokens.reshape(-1, 16), 2)
    whole.backward()
    # The logged value is the mean over ranks; DDP / FSDP2 average the gradients over ranks (hence the / 2).
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole.detach(), rtol=1e-6, atol=1e-6)
    for r, got in enumerate(ranks):
        expected = tokens.grad[:, r * 4 : (r + 1) * 4].reshape(-1, 16)
        torch.testing.assert_close(got["grad"] / 2, expected, rtol=1e-5, atol=1e-7)
    # Nearest neighbours across ranks matter: a rank alone would give another loss.
    alone = koleo_loss(tokens.detach()[:, :4].reshape(-1, 16), 2)
    assert abs(float(alone) - float(ranks[0]["loss"])) > 1e-3
