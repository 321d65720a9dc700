"""Vision Transformer backbone with an optional mask token (iBOT student) and cached position-embedding resampling.

Pre-norm ViT as in the official iBOT / DINO code: conv patch embedding, learned absolute position embedding
(bicubic-resampled for other grids), a cls token, `depth` blocks, final LayerNorm (eps 1e-6), qkv bias.
Attention goes through `ibot_engine.model.attention` (SDPA by default, xformers or FlexAttention; never an explicit
softmax(QK^T)); `forward_packed` runs crops of several resolutions as one packed token sequence.

Per block, optionally: activation checkpointing (full, or selective: matmul and attention outputs saved,
elementwise ops recomputed) and stochastic depth computed only for the kept samples (`drop_path_impl=subset`).

Masking (as in the official `masked_embed`): masked patch embeddings are replaced by the learned mask token *before* the
position embedding is added, so masked tokens keep their position; the cls token is never masked. Only the
student has a mask token.

Shapes: B images, N patches (h * w), D embed dim, T = 1 + N tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibot_engine.accel import apex_usable, nvidia_apex
from ibot_engine.model.attention import Packing, attend, make_packing


@dataclass(frozen=True)
class ViTArch:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


ARCHS = {
    "vit_tiny": ViTArch(192, 12, 3),
    "vit_small": ViTArch(384, 12, 6),
    "vit_base": ViTArch(768, 12, 12),
    "vit_large": ViTArch(1024, 24, 16),
}
INIT_SCHEMES = ("trunc_normal", "xavier")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa", sdpa_backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend, self.sdpa_backend = backend, sdpa_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        """x [B, T, D] (or packed [S, D] with `packing`) -> same shape."""
        return self.proj(attend(self.qkv(x), self.num_heads, self.backend, self.sdpa_backend, packing))


def default_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


def norm_layer(impl: str) -> Callable[[int], nn.Module]:
    """The LayerNorm factory (dim -> module, eps 1e-6) for `model.norm_impl`. Parameters are named weight / bias
    either way, so checkpoints move between the two; apex's FusedLayerNorm runs torch's kernel on CPU tensors."""
    if impl == "apex" and apex_usable("model.norm_impl", torch.device("cuda")):
        return partial(nvidia_apex().normalization.FusedLayerNorm, eps=1e-6)
    return default_norm


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(x_BTD: Tensor, p: float, training: bool, packing: Packing | None = None) -> Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability p, rescale the rest.

    Packed input [S, D]: one draw per sequence, spread over its tokens with `packing.sample`.
    """
    if p == 0.0 or not training:
        return x_BTD
    if packing is not None:
        keep = x_BTD.new_empty(packing.num_sequences).bernoulli_(1.0 - p).div_(1.0 - p)
        return x_BTD * keep[packing.sample].unsqueeze(-1)
    keep = x_BTD.new_empty(x_BTD.shape[0], 1, 1).bernoulli_(1.0 - p)
    return x_BTD * keep.div_(1.0 - p)


def drop_add_subset(x_BTD: Tensor, branch: Callable[[Tensor], Tensor], p: float) -> Tensor:
    """x + drop_path(branch(x)), computing the branch only for the kept samples (DINOv2's efficient form).

    A fixed number of samples, max(int(B * (1 - p)), 1), is kept (uniformly without replacement) and their
    branch output is scaled by B / kept, so the expectation equals the branch's; the dropped samples cost nothing.
    The count is static, so compiled blocks see no dynamic shapes.
    """
    B = x_BTD.shape[0]
    kept = max(int(B * (1.0 - p)), 1)
    index = torch.randperm(B, device=x_BTD.device)[:kept]
    out = branch(x_BTD.index_select(0, index))
    return torch.index_add(x_BTD, 0, index, out.to(x_BTD.dtype), alpha=B / kept)


# Activation checkpointing policy "selective": keep the outputs of matmuls and attention (expensive to recompute),
# recompute the cheap, memory-heavy elementwise ops (LayerNorm, GELU, residual adds, drop-path) in the backward.
_SAC_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _checkpoint_kwargs() -> dict:
    import inspect

    from torch.utils.checkpoint import checkpoint

    # torch >= 2.14: tensors saved by a selective region go through saved-tensor hooks (save_on_cpu, our tests)
    # like any other saved tensor; older versions bypass them and do not know the argument.
    known = "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    return {"respect_saved_tensors_hooks": True} if known else {}


_CHECKPOINT_KWARGS = _checkpoint_kwargs()


def _sac_policy(ctx, op, *args, **kwargs):  # torch.utils.checkpoint policy signature
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_sac_policy)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, layerscale: float, *,
                 attention: str = "sdpa", sdpa_backend: str = "auto", drop_path_impl: str = "mask",
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or default_norm
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attention, sdpa_backend)
        self.ls1 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.drop_path = drop_path
        self.drop_path_impl = drop_path_impl
        self.checkpointing = "none"  # none | full | selective, set by `ibot_engine.model.ibot.apply_train_options`

    def _attn_branch(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), packing))

    def _mlp_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward(self, x: Tensor, packing: Packing | None) -> Tensor:
        if self.training and self.drop_path > 0 and self.drop_path_impl == "subset" and packing is None:
            x = drop_add_subset(x, self._attn_branch, self.drop_path)
            return drop_add_subset(x, self._mlp_branch, self.drop_path)
        x = x + drop_path(self._attn_branch(x, packing), self.drop_path, self.training, packing)
        return x + drop_path(self._mlp_branch(x), self.drop_path, self.training, packing)

    def forward(self, x_BTD: Tensor, packing: Packing | None = None) -> Tensor:
        """x [B, T, D], or the packed [S, D] tokens of several resolutions with `packing`."""
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self._forward(x_BTD, packing)
        from torch.utils.checkpoint import checkpoint, noop_context_fn

        context_fn = _selective_context if self.checkpointing == "selective" else noop_context_fn
        # preserve_rng_state: the recomputation draws the same drop-path masks as the forward did.
        return checkpoint(self._forward, x_BTD, packing, use_reentrant=False, context_fn=context_fn,
                          preserve_rng_state=True, **_CHECKPOINT_KWARGS)


class VisionTransformer(nn.Module):
    """ViT backbone: `forward(images, masks=None) -> tokens [B, 1 + N, D]` after the final LayerNorm."""

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 16,
        img_size: int = 224,
        drop_path: float = 0.0,
        drop_path_uniform: bool = False,
        layerscale: float = 0.0,
        mask_token: bool = False,
        attention: str = "sdpa",
        sdpa_backend: str = "auto",
        drop_path_impl: str = "mask",
        norm_layer: Callable[[int], nn.Module] | None = None,
        init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown model.arch {arch!r}; one of {sorted(ARCHS)}")
        a = ARCHS[arch]
        self.arch, self.patch_size, self.embed_dim = arch, patch_size, a.embed_dim
        self.base_grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = nn.Conv2d(3, a.embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.base_grid[0] * self.base_grid[1], a.embed_dim))
        # Student only (the teacher never sees masked crops): zero-initialised as in the official `masked_embed`.
        self.mask_token = nn.Parameter(torch.zeros(1, a.embed_dim)) if mask_token else None
        # Stochastic depth: linear over depth from 0 (official iBOT / DINO), or the same rate in every block
        # (DINOv2's drop_path_uniform, lightly's example). linspace on the CPU: the model can be built on meta.
        rates = ([drop_path] * a.depth if drop_path_uniform
                 else torch.linspace(0, drop_path, a.depth, device="cpu").tolist())
        self.attention = attention
        self.blocks = nn.ModuleList(
            Block(a.embed_dim, a.num_heads, a.mlp_ratio, r, layerscale, attention=attention,
                  sdpa_backend=sdpa_backend, drop_path_impl=drop_path_impl, norm_layer=norm_layer)
            for r in rates
        )
        self.norm = (norm_layer or default_norm)(a.embed_dim)
        self._resample_cache: dict[tuple[int, int, torch.device], Tensor] = {}
        self.init_weights(init)

    def init_weights(self, scheme: str = "trunc_normal") -> None:
        """`trunc_normal`: the official iBOT / DINO / timm init (every Linear N(0, 0.02) truncated, the patch
        embedding's conv PyTorch's default). `xavier`: the MAE init that lightly's iBOT uses (Xavier-uniform Linear
        layers and patch-embedding weight, cls token N(0, 0.02)). Both: position embedding N(0, 0.02) truncated, zero
        biases, LayerNorm 1 / 0, zero mask token.

        The scales differ by 2-3x (Xavier gives std 0.05-0.07 at ViT-tiny widths): on short runs from scratch
        the larger init learns much faster (see docs/learning.md).
        """
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"model.init={scheme!r}: one of {INIT_SCHEMES}")
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if scheme == "xavier":
            nn.init.normal_(self.cls_token, std=0.02)
            nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        else:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if scheme == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) or type(m).__name__ == "FusedLayerNorm":
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _resample_matrix(self, h: int, w: int, device: torch.device) -> Tensor:
        """[h*w, h0*w0] matrix R with R @ pos == bicubic resample of pos from the base grid to (h, w).

        Resampling is linear in the embedding, so the matrix is computed once per grid (by resampling the
        identity) and cached; each forward is then one small matmul that gradients flow through. Caching the
        resampled embedding itself would go stale after every optimizer / EMA step.
        """
        key = (h, w, device)
        if key not in self._resample_cache:
            h0, w0 = self.base_grid
            eye = torch.eye(h0 * w0, device=device, dtype=torch.float32).reshape(h0 * w0, 1, h0, w0)
            rows = F.interpolate(eye, size=(h, w), mode="bicubic", align_corners=False)
            self._resample_cache[key] = rows.reshape(h0 * w0, h * w).t().contiguous()
        return self._resample_cache[key]

    def pos_embed_for(self, h: int, w: int) -> Tensor:
        """Position embedding [1, 1 + h*w, D] for an h x w patch grid."""
        if (h, w) == self.base_grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        patch_pos = self._resample_matrix(h, w, patch_pos.device) @ patch_pos.float()
        return torch.cat([cls_pos, patch_pos.to(self.pos_embed.dtype)[None]], dim=1)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        x = self.patch_embed(images)  # [B, D, h, w]
        B, _, h, w = x.shape
        x_BND = x.flatten(2).transpose(1, 2)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given to a backbone built without a mask token (the teacher never masks)")
            x_BND = torch.where(masks.reshape(B, h * w, 1), self.mask_token.to(x_BND.dtype), x_BND)
        x_BTD = torch.cat([self.cls_token.expand(B, -1, -1).to(x_BND.dtype), x_BND], dim=1)
        return x_BTD + self.pos_embed_for(h, w)

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        x_BTD = self.prepare_tokens(images, masks)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.norm(x_BTD)

    def forward_packed(self, inputs: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
        """`forward` of several batches of crops (e.g. global and local sizes) in one pass of packed tokens.

        inputs: (images [B_i, 3, H_i, W_i], masks [B_i, h_i, w_i] or None) per resolution group. Returns the tokens
        [B_i, 1 + N_i, D] of each group, as `forward` would (see `ibot_engine.model.attention` for the packing).
        """
        tokens = [self.prepare_tokens(images, masks) for images, masks in inputs]
        groups = tuple((t.shape[0], t.shape[1]) for t in tokens)
        packing = make_packing(groups, self.attention, tokens[0].device)
        x_SD = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
        for block in self.blocks:
            x_SD = block(x_SD, packing)
        x_SD = self.norm(x_SD)
        return [part.reshape(n, T, -1) for part, (n, T) in zip(x_SD.split([n * T for n, T in groups]), groups)]
