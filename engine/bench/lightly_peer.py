"""The peer row of `ibot bench --compare lightly`: lightly's iBOT example training step (lightly_example.py), timed
in its best form.

"Best form" (the fastest way a user of lightly would run the example, so the comparison is fair to it): bf16
autocast where our run uses it, block masks drawn outside the step (a fixed set, cycled, as a data loader would hand
them over) and `torch.compile` on the ViT blocks when our run compiles. Same device, batch, crops, K and head widths
as our row; the example's model, schedules (spanning the timed run) and step otherwise, unchanged.

Needs the `bench` extra (`pip install 'ibot-engine[bench]'`: lightly and timm); `require_lightly()` checks it
before any benchmark runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ibot_engine.bench.lightly_example import (
    LightlyExample,
    block_masks,
    example_losses,
    example_optimizer,
    lightly_example_step,
)
from ibot_engine.bench.timing import (
    BenchRow,
    count_flops,
    free_device_memory,
    make_row,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
    time_steps,
)
from ibot_engine.config import Config

# The example warms its teacher temperature up over 30 of its 50 epochs; the timed run's schedules do the same.
WARMUP_SHARE = 30 / 50


class LightlyStep:
    """lightly's iBOT step on synthetic inputs already on `device`; `bench()` gives its `BenchRow`.

    The example's schedules span the warm-up and timed steps of `bench` (the flop count and the batch search run
    step 0).
    """

    def __init__(self, cfg: Config, device: torch.device, *, batch_size: int, amp_dtype: torch.dtype | None,
                 num_batches: int = 4) -> None:
        self.cfg, self.device, self.batch_size, self.amp_dtype = cfg, device, batch_size, amp_dtype
        self.num_batches, self.total_steps = num_batches, 1
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        self.model = LightlyExample(arch=m.arch, patch_size=m.patch_size, img_size=cfg.data.global_size,
                                    out_dim=m.out_dim, hidden_dim=m.head_hidden_dim,
                                    bottleneck_dim=m.head_bottleneck_dim).to(device)
        self.model.train()
        if cfg.train.compile:  # the example's best form compiles the ViT blocks (timm: one nn.Sequential)
            for backbone in (self.model.student_backbone, self.model.teacher_backbone):
                backbone.vit.blocks = torch.compile(backbone.vit.blocks)
        self.dino, self.ibot = (loss.to(device) for loss in example_losses(m.out_dim))
        self.optimizer = example_optimizer(self.model)
        self.grid = cfg.data.global_size // m.patch_size
        self.inputs = self.make_inputs(batch_size, num_batches)
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp_dtype]
        self.description = (f"lightly 1.6 iBOT example step, timm {self.model.timm_name} (patch {m.patch_size}), "
                            f"{precision}, masks made outside the step"
                            + (", torch.compile on the ViT blocks" if cfg.train.compile else ""))

    def make_inputs(self, batch_size: int, num_batches: int) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """(global views [G*B, 3, Hg, Wg], local views [L*B, 3, Hl, Wl] or None, block masks [G*B, h, w])."""
        d, dev = self.cfg.data, self.device
        random.seed(self.cfg.train.seed)  # lightly's mask generator draws from Python's `random`
        gen = torch.Generator(device=dev).manual_seed(self.cfg.train.seed + 1)
        out = []
        for _ in range(num_batches):
            g = torch.randn(d.num_global * batch_size, 3, d.global_size, d.global_size, device=dev, generator=gen)
            local = (torch.randn(d.num_local * batch_size, 3, d.local_size, d.local_size, device=dev, generator=gen)
                     if d.num_local else None)
            out.append((g, local, block_masks(g.shape[0], self.grid, dev)))
        return out

    def step(self, inputs: tuple[Tensor, Tensor | None, Tensor], i: int = 0) -> Tensor:
        global_views, local_views, block_mask = inputs
        out = lightly_example_step(self.model, self.optimizer, self.dino, self.ibot, global_views, local_views,
                                   block_mask, step=i, total_steps=self.total_steps,
                                   warmup_steps=int(WARMUP_SHARE * self.total_steps),
                                   num_global=self.cfg.data.num_global, amp_dtype=self.amp_dtype)
        return out["loss_cls"] + out["loss_patch"]

    def run(self, i: int) -> float:
        self.step(self.inputs[i % len(self.inputs)], i)
        return 0.0  # inputs are already on the device: no data wait

    def bench(self, *, steps: int, warmup: int, peak: float | None, baseline_bytes: int = 0) -> BenchRow:
        self.total_steps = warmup + steps
        flops = count_flops(lambda: self.run(0))
        reset_peak_memory(self.device)
        times = time_steps(self.run, steps=steps, warmup=warmup, device=self.device)
        # On CPU the peak RSS is the whole process's, ours included: not reported for the peer.
        memory = peak_memory_gib(self.device, baseline_bytes) if self.device.type == "cuda" else None
        return make_row("lightly 1.6 (best form)", self.batch_size, times, flops, peak, memory)

    def batch_trier(self, steps: int = 2) -> Callable[[int], Any]:
        def try_batch(b: int) -> None:
            self.optimizer.zero_grad(set_to_none=True)
            self.inputs = []
            free_device_memory(self.device)
            try:
                inputs = self.make_inputs(b, 1)[0]
                for _ in range(steps):
                    self.step(inputs)
                synchronize(self.device)
            finally:
                inputs = None
                self.optimizer.zero_grad(set_to_none=True)
                free_device_memory(self.device)

        return try_batch
