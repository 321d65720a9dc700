"""`ibot profile`: torch.profiler over real training steps, traces and a time-per-kernel-category table.

    ibot profile --config launch/configs/vit_s16.yaml train.batch_size=64 --wait 1 --warmup 1 --active 3 --out DIR

Runs the `ibot bench` harness (engine/bench/harness.py: `build_trainer` + `train_step`, synthetic batches on the device
or `--data`) under `torch.profiler.profile(schedule(wait, warmup, active))` with CPU (+ CUDA) activities,
`record_shapes` and `profile_memory`, and writes to DIR:
* `trace.json`: Chrome trace (chrome://tracing, https://ui.perfetto.dev);
* `tb/`: the same trace for TensorBoard's profiler plugin (`tensorboard_trace_handler`);
* `summary.md`: time per kernel category (`classify`) with its share, and the top 20 kernels by self device time
  (CUDA) or self CPU time (CPU);
* `memory_snapshot.pickle` on CUDA (`torch.cuda.memory._record_memory_history` over the profiled steps; open it
  at https://pytorch.org/memory_viz). Nothing on CPU, which has no such recorder.

The harness adds `record_function` ranges around whole calls only: `ibot.data` (batch fetch), `ibot.step`
(`train_step`) and `ibot.ema` (the teacher update, wrapped on this model instance); nothing is added to the step.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

from ibot_engine.bench.harness import build_harness
from ibot_engine.bench.report import command_line, environment, header_lines
from ibot_engine.config import Config
from ibot_engine.distributed import init_distributed, teardown

log = logging.getLogger(__name__)

CATEGORIES = ("gemm", "attention", "elementwise/norm", "loss", "ema", "optimizer", "data", "communication", "other")
DATA_RANGE, STEP_RANGE, EMA_RANGE = "ibot.data", "ibot.step", "ibot.ema"

_COMM = re.compile(r"nccl|gloo|c10d::|all_?reduce|all_?gather|reduce_?scatter|broadcast|alltoall", re.I)
_EMA = re.compile(r"_ema_kernel|lerp|ema_update", re.I)
_OPTIM = re.compile(r"adam|optimizer\.step|_foreach_|multi_tensor_apply|lpnorm|clip_grad", re.I)
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product|mem_eff|_attn_", re.I)
_LOSS = re.compile(r"_ce_fwd_kernel|centered_softmax|softmax|cross_entropy|sinkhorn", re.I)
_GEMM = re.compile(r"gemm|xmma|cutlass|cublas|wgmma|s16816|s1688|sm90_|sm80_|matmul|conv|mkldnn|aten::(?:mm|addmm|"
                   r"bmm|baddbmm|addbmm|linear|mv|addmv|dot)$", re.I)
_OVERHEAD = re.compile(r"aten::(?:empty\w*|view|_?unsafe_view|as_strided|resize_|t|transpose|reshape|permute|expand|"
                       r"slice|select|unsqueeze|squeeze|detach_?|alias|contiguous|result_type|lift_fresh|"
                       r"_reshape_alias|set_|numpy_T|split|chunk|unbind|narrow|zeros_like|empty_like)$")
_ELEMENTWISE = re.compile(r"elementwise|vectorized|unrolled|reduce|norm|gelu|triton_(?:poi|per|red)|aten::", re.I)


def classify(name: str, context: Sequence[str] = ()) -> str:
    """Category of a kernel or op `name` launched inside the enclosing ops / ranges `context` (outermost first).

    Own-name rules first (communication, EMA, attention, loss, GEMM, optimizer), then the enclosing range decides
    what the name alone cannot (`ibot.data`, `ibot.ema`, an optimizer step, `_foreach_lerp_` in the reference EMA),
    then elementwise/norm; views, allocations and unknown names are other.
    """
    if _COMM.search(name):
        return "communication"
    if DATA_RANGE in context or name == DATA_RANGE:
        return "data"
    if _EMA.search(name) or EMA_RANGE in context or any(_EMA.search(c) for c in context):
        return "ema"
    if _ATTENTION.search(name):
        return "attention"
    if _LOSS.search(name):
        return "loss"
    if _GEMM.search(name):
        return "gemm"
    if _OPTIM.search(name) or any(_OPTIM.search(c) for c in context):
        return "optimizer"
    if any(_ATTENTION.search(c) for c in context):
        return "attention"
    if any(_LOSS.search(c) for c in context):  # work inside a loss op or its backward node
        return "loss"
    if _OVERHEAD.search(name):
        return "other"
    if _ELEMENTWISE.search(name):
        return "elementwise/norm"
    return "other"


@dataclass
class KernelTime:
    name: str
    category: str
    calls: int
    time_us: float


def _ancestors(event: Any) -> tuple[str, ...]:
    names = []
    parent = event.cpu_parent if event is not None else None
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return tuple(reversed(names))


def kernel_times(events: Sequence[Any], device: bool) -> list[KernelTime]:
    """Self time per kernel (device=True: CUDA kernels / copies, device time) or per CPU op (self CPU time),
    aggregated by name and category from the profiler's `FunctionEvent`s."""
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])

    def add(name: str, category: str, us: float) -> None:
        slot = totals[(name, category)]
        slot[0] += 1
        slot[1] += us

    if device:
        cpu_by_id = {e.id: e for e in events if e.device_type == DeviceType.CPU}
        for e in events:
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue  # user annotations mirror record_function ranges on the GPU timeline: not kernels
            launcher = cpu_by_id.get(getattr(e, "linked_correlation_id", 0))
            context = (*_ancestors(launcher), launcher.name) if launcher is not None else ()
            add(e.name, classify(e.name, context), e.time_range.elapsed_us())
    else:
        for e in events:
            if e.device_type != DeviceType.CPU or e.is_async or e.name.startswith("ProfilerStep#"):
                continue
            add(e.name, classify(e.name, _ancestors(e)), e.self_cpu_time_total)
    rows = [KernelTime(name, cat, int(n), us) for (name, cat), (n, us) in totals.items()]
    return sorted(rows, key=lambda r: -r.time_us)


def summary_markdown(rows: Sequence[KernelTime], *, device: bool, header: dict[str, str], steps: int,
                     notes: Sequence[str] = ()) -> str:
    total = sum(r.time_us for r in rows) or 1.0
    by_cat = dict.fromkeys(CATEGORIES, 0.0)
    for r in rows:
        by_cat[r.category] += r.time_us
    what = "self device (CUDA kernel) time" if device else "self CPU time of every op"
    lines = header_lines("ibot profile", header, table=True)
    lines += ["", f"## Time per category ({what}, {steps} active steps)", "",
              "| category | ms per step | share |", "|---|---|---|"]
    lines += [f"| {c} | {by_cat[c] / steps / 1e3:.3f} | {100 * by_cat[c] / total:.1f}% |" for c in CATEGORIES]
    lines += [f"| total | {total / steps / 1e3:.3f} | 100% |", "", f"## Top 20 by {what}", "",
              "| # | name | category | calls | ms per step | share |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows[:20], 1):
        name = r.name if len(r.name) <= 90 else r.name[:87] + "..."
        name = name.replace("|", "\\|")
        lines.append(f"| {i} | `{name}` | {r.category} | {r.calls // steps} | {r.time_us / steps / 1e3:.3f} | "
                     f"{100 * r.time_us / total:.1f}% |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _ranged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def profile_main(args: Any, cfg: Config) -> Path:
    """`ibot profile` (args from engine/cli.py); returns the output folder."""
    if args.wait < 0 or args.warmup < 0 or args.active < 1:
        raise ValueError(f"--wait and --warmup must be >= 0 and --active >= 1, got {args.wait} / {args.warmup} / "
                         f"{args.active}")
    out = Path(args.out or f"runs/profile_{cfg.model.arch}{cfg.model.patch_size}")
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed()
    try:
        h = build_harness(cfg, env, real_data=args.data)
        device = env.device
        cuda = device.type == "cuda"
        model = h.trainer.model
        model.update_teacher = _ranged(EMA_RANGE, model.update_teacher)  # this instance only, for the table

        def run(i: int) -> None:
            with record_function(DATA_RANGE):
                batch = h.next_batch(i)
            with record_function(STEP_RANGE):
                h.step(batch, i)

        run(0)  # first step outside the profile: lazy init, optimizer state, compilation
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        tb_handler = torch.profiler.tensorboard_trace_handler(str(out / "tb"), worker_name=f"rank{env.rank}")
        captured: dict[str, Any] = {}

        def on_ready(prof: torch.profiler.profile) -> None:
            # A kineto trace can be saved once: TensorBoard's handler writes it, trace.json is a copy of that file.
            before = set((out / "tb").glob("*.pt.trace.json*"))
            tb_handler(prof)
            written = sorted(set((out / "tb").glob("*.pt.trace.json*")) - before)
            shutil.copyfile(written[-1], out / "trace.json")
            captured["rows"] = kernel_times(prof.events(), device=cuda)

        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        schedule = torch.profiler.schedule(wait=args.wait, warmup=args.warmup, active=args.active, repeat=1)
        with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_ready,
                                    record_shapes=True, profile_memory=True, with_stack=False) as prof:
            for i in range(args.wait + args.warmup + args.active):
                run(1 + i)
                prof.step()
        notes = [f"categories: {', '.join(CATEGORIES)} (ibot_engine.bench.profile.classify on kernel / op names and "
                 "the enclosing ranges ibot.data, ibot.ema, optimizer step)"]
        if not cuda:
            notes.append("the self CPU time of the ibot.step range is host time between ops (Python, dispatch)")
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.memory._dump_snapshot(str(out / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
            notes.append("memory_snapshot.pickle: open at https://pytorch.org/memory_viz")
        else:
            notes.append("CPU run: no CUDA memory snapshot (torch.cuda.memory has no CPU recorder); times are self "
                         "CPU time per op, including the profiler's own overhead")
        header = {**environment(device, command_line("ibot", args.argv)),
                  "config": f"{cfg.model.arch}/{cfg.model.patch_size}, batch {cfg.train.batch_size}, "
                  f"{cfg.data.num_global} x {cfg.data.global_size} + {cfg.data.num_local} x {cfg.data.local_size}, "
                  f"K {cfg.model.out_dim}, precision {cfg.precision}, compile {cfg.train.compile}",
                  "schedule": f"wait {args.wait}, warmup {args.warmup}, active {args.active}"}
        text = summary_markdown(captured["rows"], device=cuda, header=header, steps=args.active, notes=notes)
        if env.is_main:
            (out / "summary.md").write_text(text)
        print(text)
        print(f"profile: {out} (trace.json, tb/, summary.md{', memory_snapshot.pickle' if cuda else ''})")
        return out
    finally:
        teardown()
