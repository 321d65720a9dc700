"""Process setup: rank, world size and device from torchrun's or SLURM's environment; collectives that no-op at
world size 1.

Where the ranks come from, first match wins:
* torchrun (or any launcher that sets WORLD_SIZE / RANK / LOCAL_RANK and MASTER_ADDR / MASTER_PORT);
* a SLURM job step started by `srun` directly, one task per device: SLURM_PROCID, SLURM_NTASKS (the step's
  SLURM_STEP_NUM_TASKS when set) and SLURM_LOCALID. The rendezvous is MASTER_ADDR / MASTER_PORT when set
  (the override, e.g. exported by launch/slurm.sbatch), else the first host of SLURM_JOB_NODELIST
  (`scontrol show hostnames`) and port 29500 + SLURM_JOB_ID % 1000;
* otherwise a single process.

NCCL on GPUs (one device per local rank), gloo on CPU. `teardown()` belongs in a `finally`.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as `gpu[003-004,007]` (expanded by `scontrol`)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with `scontrol show hostnames` ({err}); "
            "export MASTER_ADDR (and MASTER_PORT) before `srun` instead"
        ) from err
    if not out:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` printed no host; export MASTER_ADDR instead")
    return out[0]


def slurm_environment(env: os._Environ | dict[str, str] = os.environ) -> dict[str, str] | None:
    """torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for a process started by
    `srun` directly, or None when this is not a SLURM job step (or a launcher already set WORLD_SIZE)."""
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return None  # torchrun / plain process / the batch script itself (no job step)
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": ntasks, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if int(ntasks) > 1:
        out["MASTER_ADDR"] = env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"])
        out["MASTER_PORT"] = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    return out


def init_distributed() -> DistEnv:
    """One process per device. With WORLD_SIZE > 1 (torchrun, or srun-direct via `slurm_environment`) joins the
    process group: NCCL on GPUs, gloo on CPU."""
    slurm = slurm_environment()
    if slurm is not None:
        os.environ.update(slurm)  # init_process_group("env://") and child code read the torchrun names
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # One device per local rank; `% count` covers launchers that already narrowed CUDA_VISIBLE_DEVICES to
        # this task's GPU (srun --gpus-per-task=1).
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None,
            store=_elastic_round_store(rank, world_size),
            rank=rank, world_size=world_size,
        )
    return DistEnv(rank, world_size, local_rank, device)


def _elastic_round_store(rank: int, world_size: int) -> dist.Store | None:
    """Under a torchrun agent, its store with a per-attempt key prefix; None (env:// rendezvous) otherwise.

    torchrun (torch 2.14) keeps one TCPStore server for all rendezvous rounds and its workers connect to it with no
    per-round prefix, so after an elastic restart the new workers can read the dead workers' process-group keys
    (gloo: peer addresses) and hang or fail connecting. Each worker counts itself in once on start; with a fixed
    world size, attempt k is workers k*W .. k*W+W-1, and every worker of the attempt derives the same prefix.
    (A worker that dies before counting itself would shift the count: a failure in the first second of an attempt.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timedelta(minutes=10))
    attempt = (store.add("ibot/workers_started", 1) - 1) // world_size
    return dist.PrefixStore(f"ibot/attempt_{attempt}/", store)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of ranks in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity at world size 1."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place; the identity at world size 1."""
    if is_distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenation of every rank's tensor along dim 0; the backward hands each rank the gradient of its own
    rows, summed over the ranks whose losses used them (an all-reduce, which every backend has, then a slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank = x.shape[0], rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())  # small tensors (embeddings): the list form every version has
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[W * n, ...]: rank r's rows at [r * n, (r + 1) * n); differentiable. The identity at world size 1."""
    return _AllGatherWithGrad.apply(x) if is_distributed() else x


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a small picklable value); `obj` itself at world size 1."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
