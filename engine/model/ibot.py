"""iBOT student and teacher: ViT backbone + shared projection head, EMA teacher, centres.

The student sees the masked global crops and the unmasked local crops in one `forward` call (one DDP/FSDP
forward per step) and runs its head once, on the cls tokens of every crop plus the masked global tokens only
(the unmasked global tokens never enter the loss, so projecting them to K prototypes would be wasted work). The
teacher (EMA of the student, eval mode, no drop-path, no mask token, no grad) sees the unmasked global crops only:
its patch targets are of the image the student sees masked.

Shapes: G global views, L local views, B images per view, N patches per global crop, D embed dim, K prototypes,
M masked tokens (flat indices into [G*B, N], `mask.nonzero()` order).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ibot_engine.config import LossConfig, ModelConfig, TrainConfig
from ibot_engine.model.head import IBOTHead
from ibot_engine.model.vit import VisionTransformer, norm_layer
from ibot_engine.objective import AllReduce, update_centers_
from ibot_kernels import ema_update_


class NetworkOutput(NamedTuple):
    """What `IBOTNetwork.forward` returns (the student's outputs; the teacher's are `TeacherOutput`)."""

    cls_logits: Tensor  # [(G+L)*B, K] head logits of every crop's cls token
    patch_logits: Tensor  # [M, K] head logits of the selected patch tokens
    cls_tokens: Tensor  # [G*B, D] backbone cls tokens of the global crops (KoLeo, training-health metrics)


class TeacherOutput(NamedTuple):
    cls_logits: Tensor  # [G*B, K]
    patch_logits: Tensor  # [M, K]
    patch_sum: Tensor  # [K] fp32 sum of the teacher patch logits that define the patch centre
    patch_count: int  # how many rows patch_sum adds up
    cls_tokens: Tensor  # [G*B, D] backbone cls tokens (training-health metrics)


class IBOTNetwork(nn.Module):
    """Backbone + head. `forward` returns cls logits of every crop and logits of the selected patch tokens."""

    def __init__(self, cfg: ModelConfig, *, student: bool) -> None:
        super().__init__()
        self.backbone = VisionTransformer(
            cfg.arch,
            patch_size=cfg.patch_size,
            img_size=cfg.img_size,
            drop_path=cfg.drop_path if student else 0.0,
            drop_path_uniform=cfg.drop_path_uniform,
            layerscale=cfg.layerscale,
            mask_token=student,
            attention=cfg.attention,
            sdpa_backend=cfg.sdpa_backend,
            drop_path_impl=cfg.drop_path_impl,
            norm_layer=norm_layer(cfg.norm_impl, cfg.norm_eps),
            init=cfg.init,
            num_register_tokens=cfg.num_register_tokens,
            pos_embed=cfg.pos_embed,
            rope_base=cfg.rope_base,
            norm_eps=cfg.norm_eps,
            ffn=cfg.ffn,
            qkv_k_bias=cfg.qkv_k_bias,
        )
        self.pack_crops = cfg.pack_crops and student
        self.head = IBOTHead(
            self.backbone.embed_dim,
            cfg.out_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim,
            num_layers=cfg.head_layers,
            norm_last_layer=cfg.norm_last_layer,
        )

    def forward(
        self,
        global_crops: Tensor,
        mask_indices: Tensor | None,
        masks: Tensor | None = None,
        local_crops: Tensor | None = None,
    ) -> NetworkOutput:
        """Logits of the cls tokens [(G+L)*B, K] and of the patch tokens picked by `mask_indices` [M, K]
        (every patch token of the global crops when `mask_indices` is None), and the global crops' backbone cls
        tokens [G*B, D]."""
        has_local = local_crops is not None and local_crops.shape[0] > 0
        if self.pack_crops and has_local:  # one pass of packed tokens for both resolutions
            tokens_g, tokens_l = self.backbone.forward_packed([(global_crops, masks), (local_crops, None)])
        else:
            tokens_g = self.backbone(global_crops, masks)  # [G*B, 1+R+N, D]
            tokens_l = self.backbone(local_crops) if has_local else None
        cls = [tokens_g[:, 0]]
        if tokens_l is not None:
            cls.append(tokens_l[:, 0])
        patches = tokens_g[:, self.backbone.num_prefix_tokens :].reshape(-1, tokens_g.shape[-1])
        if mask_indices is not None:
            patches = patches.index_select(0, mask_indices)
        num_cls = sum(c.shape[0] for c in cls)
        logits = self.head(torch.cat([*cls, patches]))  # one head call for every row (DINOv2's trick)
        return NetworkOutput(logits[:num_cls], logits[num_cls:], cls[0])


class IBOT(nn.Module):
    """Student, EMA teacher and the two centres. The trainer wraps `student` for DDP/FSDP."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig) -> None:
        super().__init__()
        self.student = IBOTNetwork(model_cfg, student=True)
        self.teacher = IBOTNetwork(model_cfg, student=False)
        # The teacher starts as the student (official iBOT, DINOv2), or with its own head: the one its constructor
        # drew from the same init (lightly's example). See ModelConfig.teacher_head.
        start = self.student.state_dict()
        if model_cfg.teacher_head == "independent":
            start = {k: v for k, v in start.items() if not k.startswith("head.")}
        self.teacher.load_state_dict(start, strict=False)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.patch_center_rule = loss_cfg.patch_center
        self.center_momentum = loss_cfg.center_momentum
        self.register_buffer("cls_center", torch.zeros(model_cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(model_cfg.out_dim))

    def train(self, mode: bool = True) -> IBOT:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains: no drop-path
        return self

    def ema_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """Matched (teacher, student) parameters by name; student-only ones (the mask token) have no partner."""
        student = dict(self.student.named_parameters())
        names = [name for name, _ in self.teacher.named_parameters()]
        missing = [n for n in names if n not in student]
        assert not missing, f"teacher parameters without a student partner: {missing}"
        return [p for _, p in self.teacher.named_parameters()], [student[n] for n in names]

    @torch.no_grad()
    def teacher_forward(self, global_crops: Tensor, mask_indices: Tensor) -> TeacherOutput:
        if self.patch_center_rule == "all":
            cls, patches_all, tokens = self.teacher(global_crops, None)  # head on every patch (official centre)
            patch_sum = patches_all.sum(0, dtype=torch.float32)  # no fp32 copy of the [G*B*N, K] logits
            return TeacherOutput(cls, patches_all.index_select(0, mask_indices), patch_sum, patches_all.shape[0],
                                 tokens)
        cls, patches, tokens = self.teacher(global_crops, mask_indices)
        return TeacherOutput(cls, patches, patches.sum(0, dtype=torch.float32), patches.shape[0], tokens)

    @torch.no_grad()
    def update_centers(self, teacher: TeacherOutput, all_reduce: AllReduce | None = None) -> None:
        update_centers_(self.cls_center, self.patch_center, teacher.cls_logits, teacher.patch_sum,
                        teacher.patch_count, self.center_momentum, all_reduce)

    @torch.no_grad()
    def update_teacher(self, momentum: float, pairs: tuple[list[Tensor], list[Tensor]] | None = None) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student over matched parameters (one fused call)."""
        teacher, student = pairs if pairs is not None else self.ema_pairs()
        ema_update_(teacher, student, momentum)


def apply_train_options(model: IBOT, train_cfg: TrainConfig) -> None:
    """Activation checkpointing, then per-block (and head) compile, in place: before any DDP / FSDP2 wrap, which is
    torchtitan's order. Our loop and the Lightning module both call this."""
    for block in model.student.backbone.blocks:
        block.checkpointing = train_cfg.activation_checkpointing  # the teacher runs without grad: nothing to save
    if train_cfg.compile:
        for block in [*model.student.backbone.blocks, *model.teacher.backbone.blocks]:
            block.compile(mode=train_cfg.compile_mode)
        # The heads see cls rows plus this step's masked tokens, a count that changes every step: one graph with a
        # symbolic row count serves every step (no recompiles). Padding to a static bound instead would run the
        # head on ~3x the mean masked count (official masks: up to ratio_max of every crop, mean ~0.15).
        model.student.head.compile(dynamic=True)
        model.teacher.head.compile(dynamic=True)
