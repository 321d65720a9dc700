"""Data-parallel strategies (`distributed.strategy`): none, DDP, FSDP2; the matching grad scaler and clipping.

* ddp: `DistributedDataParallel` around the student. Gradients are bucketed (`distributed.bucket_cap_mb`) and
  written straight into the buckets (`gradient_as_bucket_view`); no unused-parameter search (every student
  parameter takes part in every step); `static_graph` lets DDP skip its per-step graph bookkeeping.
* fsdp: FSDP2 `fully_shard` on every transformer block, on the head and on the root of the student, and the same
  units on the teacher, so that teacher and student parameters are sharded alike (Shard(0) over the same mesh)
  and the EMA (`ibot_kernels.ema_update_`) runs on local shards with no communication. The teacher only runs forward
  and is resharded right after it. bf16 runs use `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`.
  fp16 runs use `param_dtype=fp16` with the ordinary GradScaler, whose overflow check on DTensor shards agrees
  over ranks (tested: an inf in one rank's shard makes every rank skip the step).
* the centres are replicated buffers of the root `IBOT` module; the trainer all-reduces their batch statistics.

Gradient clipping (`clip_sharded_gradients_`) works on the local shards of DTensor gradients and sums squared norms over
ranks in one all-reduce, for both the global and the per-parameter (official) rule.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ibot_engine.config import Config
from ibot_engine.distributed import DistEnv, get_rank, is_distributed
from ibot_engine.model.ibot import IBOT
from ibot_engine.precision import autocast_dtype

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]


def check_strategy(cfg: Config, env: DistEnv) -> None:
    strategy = cfg.distributed.strategy
    if strategy == "none" and env.world_size > 1:
        raise ValueError(
            f"distributed.strategy=none with WORLD_SIZE={env.world_size}; use distributed.strategy=ddp or fsdp"
        )


def _fsdp_units(network: nn.Module, cfg: Config, env: DistEnv, *, teacher: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # fsdp in one process without a launcher: a one-rank group (no-op collectives)
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    dtype = autocast_dtype(cfg.precision, env.device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    # The teacher has no backward: gathering its parameters again for one would never happen, so always reshard.
    reshard = True if teacher else cfg.distributed.reshard_after_forward
    for block in network.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    # The head runs last in the forward; its parameters are needed again first in the backward.
    fully_shard(network.head, mesh=mesh, mp_policy=mp, reshard_after_forward=teacher)
    fully_shard(network, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)


_DDP_PARAMETERS = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters


def apply_strategy(model: IBOT, cfg: Config, env: DistEnv) -> nn.Module:
    """Wrap / shard the student (and, for FSDP, the teacher) in place; returns the module to call for the
    student's forward (the DDP wrapper, or `model.student` itself)."""
    check_strategy(cfg, env)
    strategy = cfg.distributed.strategy
    if strategy == "fsdp":
        _fsdp_units(model.student, cfg, env, teacher=False)
        _fsdp_units(model.teacher, cfg, env, teacher=True)
        return model.student
    if strategy == "ddp" and env.world_size > 1:
        # The student has no buffers that change: no buffer sync before each forward (torch >= 2.13 names the
        # option forward_sync_buffers and deprecates broadcast_buffers; older releases only know the latter).
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
                          else {"broadcast_buffers": False})
        return nn.parallel.DistributedDataParallel(
            model.student,
            device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            **no_buffer_sync,
            bucket_cap_mb=cfg.distributed.bucket_cap_mb,
            gradient_as_bucket_view=True,
            find_unused_parameters=False,
            # DDP's static-graph mode records the first iterations' hook order and fails an internal assert when
            # they run under no_sync (gradient accumulation): off when accumulating.
            static_graph=cfg.distributed.static_graph and cfg.train.accum_steps == 1,
        )
    return model.student


def build_grad_scaler(cfg: Config, env: DistEnv) -> torch.amp.GradScaler:
    """fp16 only. Under FSDP2 too: `unscale_` on DTensor gradient shards yields a found-inf flag that DTensor has
    already agreed over the ranks, so every rank skips the same steps and keeps the same scale (tested)."""
    return torch.amp.GradScaler(env.device.type, enabled=autocast_dtype(cfg.precision, env.device) == torch.float16)


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@torch.no_grad()
def clip_sharded_gradients_(params: list[Tensor], max_norm: float, mode: str) -> Tensor:
    """`ibot_engine.train.optim.clip_gradients_` for DTensor (FSDP2, Shard(0)) gradients: norms of the local shards,
    squared and summed over ranks in one all-reduce, so every rank scales its shards by the factors of the full
    tensors.
    Returns the global gradient norm (a replicated plain tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # Shards first, then replicated (plain) gradients, which count once: only rank 0 contributes them to the sum.
    # Which is which is known on the host, so no mask tensor is built from Python data every step.
    shards = [g.to_local() for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    local = shards + plain
    squares = torch.stack(torch._foreach_norm(local)).float().square()
    if is_distributed():
        if plain and get_rank() != 0:
            squares[len(shards):].fill_(0.0)  # a Python scalar as a kernel argument: no copy
        dist.all_reduce(squares)
    norms = squares.sqrt()
    total = squares.sum().sqrt()
    if max_norm <= 0:
        return total
    if mode == "global":
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, scale)
    else:  # per_param: each tensor by min(1, max_norm / (||g|| + 1e-6))
        scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, list(scales.unbind(0)))
    return total
