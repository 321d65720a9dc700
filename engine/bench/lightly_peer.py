"""The peer row of `ibot bench --compare lightly`: lightly's iBOT example training step, in its best form.

Written after lightly 1.6.0's iBOT example (lightly-ai/lightly `examples/pytorch/ibot.py`), read for facts: timm ViT
(learned position embedding, `dynamic_img_size=True`, LayerScale 1e-5) wrapped in lightly's
`MaskedVisionTransformerTIMM`, student = copy of the teacher with uniform drop-path 0.1, `DINOProjectionHead`s,
`DINOLoss` on the cls tokens + `IBOTPatchLoss` on the masked global tokens, AdamW, `update_momentum` EMA of backbone
and head. "Best form" (the fastest way a user of lightly would run it, so the comparison is fair to it): bf16
autocast where our run uses it, block masks drawn outside the step (a fixed set, cycled, as a data loader would hand
them over) and `torch.compile` on the ViT blocks when our run compiles. Same device, batch, crops, K and head widths
as our row.

Needs the `bench` extra (`pip install 'ibot-engine[bench]'`: lightly and timm); `require_lightly()` checks it
before any benchmark runs.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ibot_engine.bench.timing import (
    BenchRow,
    BenchSetupError,
    count_flops,
    free_device_memory,
    make_row,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
    time_steps,
)
from ibot_engine.config import Config

_TIMM_SIZE = {"vit_tiny": "tiny", "vit_small": "small", "vit_base": "base", "vit_large": "large"}
TEACHER_TEMP = 0.07
MOMENTUM = 0.996


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


def timm_name(arch: str) -> str:
    """timm model name of our `model.arch` (the patch and image size are passed to timm separately)."""
    if arch not in _TIMM_SIZE:
        raise BenchSetupError(f"--compare lightly: no timm model for model.arch {arch!r}")
    return f"vit_{_TIMM_SIZE[arch]}_patch16_224"


def build_lightly_model(cfg: Config) -> torch.nn.ModuleDict:
    import timm
    from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_drop_path_rate

    vit = timm.create_model(timm_name(cfg.model.arch), pretrained=False, patch_size=cfg.model.patch_size,
                            img_size=cfg.data.global_size, pos_embed="learn", dynamic_img_size=True,
                            init_values=1e-5)
    teacher = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
    student = copy.deepcopy(teacher)
    update_drop_path_rate(student.vit, drop_path_rate=0.1, mode="uniform")
    teacher.requires_grad_(False)

    def head() -> DINOProjectionHead:
        return DINOProjectionHead(input_dim=vit.embed_dim, hidden_dim=cfg.model.head_hidden_dim,
                                  bottleneck_dim=cfg.model.head_bottleneck_dim, output_dim=cfg.model.out_dim)

    student_head, teacher_head = head(), head()
    teacher_head.load_state_dict(student_head.state_dict())
    teacher_head.requires_grad_(False)
    return torch.nn.ModuleDict({"sb": student, "tb": teacher, "sh": student_head, "th": teacher_head})


class LightlyStep:
    """lightly's iBOT step on synthetic inputs already on `device`; `bench()` gives its `BenchRow`."""

    def __init__(self, cfg: Config, device: torch.device, *, batch_size: int, amp_dtype: torch.dtype | None,
                 num_batches: int = 4) -> None:
        from lightly.loss import DINOLoss, IBOTPatchLoss

        self.cfg, self.device, self.batch_size, self.amp_dtype = cfg, device, batch_size, amp_dtype
        self.num_batches = num_batches
        torch.manual_seed(cfg.train.seed)
        self.model = build_lightly_model(cfg).to(device)
        self.model.train()
        if cfg.train.compile:  # the example's best form compiles the ViT blocks (timm: one nn.Sequential)
            for key in ("sb", "tb"):
                self.model[key].vit.blocks = torch.compile(self.model[key].vit.blocks)
        K = cfg.model.out_dim
        self.dino = DINOLoss(output_dim=K, teacher_temp=TEACHER_TEMP).to(device)
        self.ibot = IBOTPatchLoss(output_dim=K, teacher_temp=TEACHER_TEMP).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        self.grid = cfg.data.global_size // cfg.model.patch_size
        self.inputs = self.make_inputs(batch_size, num_batches)
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp_dtype]
        self.description = (f"lightly 1.6 iBOT example step, timm {timm_name(cfg.model.arch)} "
                            f"(patch {cfg.model.patch_size}), {precision}, masks made outside the step"
                            + (", torch.compile on the ViT blocks" if cfg.train.compile else ""))

    def make_inputs(self, batch_size: int, num_batches: int) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """(global views [G*B, 3, Hg, Wg], local views [L*B, 3, Hl, Wl] or None, block masks [G*B, h, w])."""
        from lightly.models.utils import random_block_mask

        d, dev = self.cfg.data, self.device
        random.seed(self.cfg.train.seed)  # lightly's mask generator draws from Python's `random`
        gen = torch.Generator(device=dev).manual_seed(self.cfg.train.seed + 1)
        out = []
        for _ in range(num_batches):
            g = torch.randn(d.num_global * batch_size, 3, d.global_size, d.global_size, device=dev, generator=gen)
            local = (torch.randn(d.num_local * batch_size, 3, d.local_size, d.local_size, device=dev, generator=gen)
                     if d.num_local else None)
            # lightly's default smallest block (4 patches) exceeds the masked count of grids under 40 patches
            # (tiny test configs); there its smallest block is 1 patch.
            small = self.grid * self.grid * 0.1 < 4
            masks = random_block_mask(size=(g.shape[0], self.grid, self.grid), device=dev,
                                      min_num_masks_per_block=1 if small else 4)
            out.append((g, local, masks))
        return out

    def step(self, inputs: tuple[Tensor, Tensor | None, Tensor]) -> Tensor:
        from lightly.models.utils import update_momentum

        global_views, local_views, block_mask = inputs
        m, G, L = self.model, self.cfg.data.num_global, self.cfg.data.num_local
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with amp:
            mask = global_views.new_zeros((global_views.shape[0], 1 + self.grid * self.grid), dtype=torch.bool)
            mask[:, 1:] = block_mask.flatten(start_dim=1)
            with torch.no_grad():
                teacher_tokens = m["tb"].encode(global_views)
                teacher_cls = m["th"](teacher_tokens[:, 0])
                teacher_masked = m["th"](teacher_tokens[mask])
            student_tokens = m["sb"].encode(global_views, mask=mask)
            student_cls = [m["sh"](student_tokens[:, 0])]
            student_masked = m["sh"](student_tokens[mask])
            if local_views is not None:
                student_cls.append(m["sh"](m["sb"].encode(local_views, mask=None)[:, 0]))
            loss = self.dino(teacher_out=teacher_cls.chunk(G), student_out=torch.cat(student_cls).chunk(G + L),
                             teacher_temp=TEACHER_TEMP)
            loss = loss + self.ibot(teacher_out=teacher_masked, student_out=student_masked, mask=block_mask,
                                    teacher_temp=TEACHER_TEMP)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_momentum(m["sb"], m["tb"], m=MOMENTUM)
        update_momentum(m["sh"], m["th"], m=MOMENTUM)
        return loss

    def run(self, i: int) -> float:
        self.step(self.inputs[i % len(self.inputs)])
        return 0.0  # inputs are already on the device: no data wait

    def bench(self, *, steps: int, warmup: int, peak: float | None, baseline_bytes: int = 0) -> BenchRow:
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
