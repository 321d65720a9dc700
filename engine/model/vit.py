"""Vision Transformer backbone with an optional mask token (iBOT student) and cached position-embedding resampling.

Pre-norm ViT as in the official iBOT / DINO code: conv patch embedding, learned absolute position embedding
(bicubic-resampled for other grids), a cls token, `depth` blocks, final LayerNorm (eps 1e-6), qkv bias.
Attention goes through `ibot_engine.model.attention` (SDPA by default, xformers or FlexAttention; never an explicit
softmax(QK^T)); `forward_packed` runs crops of several resolutions as one packed token sequence.

What released DINOv2 / DINOv3 backbones add, each off by default:
* register tokens (DINOv2 `*_reg`; DINOv3 calls them storage tokens): R learned tokens after the cls token, inserted
  after the position embedding is added, so they have no position; token order [cls, registers, patches];
* DINOv3's RoPE (`pos_embed="rope"`) instead of the learned position embedding: q and k of the patch tokens are
  rotated by angles of their grid coordinates normalised to [-1, 1] per axis; prefix tokens are not rotated;
* the LayerNorm eps (DINOv3: 1e-5), a SwiGLU feed-forward (DINOv3 S+/H+: keys mlp.w1/w2/w3) and DINOv3's zeroed
  K third of the qkv bias (`qkv_k_bias=False`).

Per block, optionally: activation checkpointing (full, or selective: matmul and attention outputs saved,
elementwise ops recomputed) and stochastic depth computed only for the kept samples (`drop_path_impl=subset`).

Masking (as in the official `masked_embed`): masked patch embeddings are replaced by the learned mask token *before* the
position embedding is added, so masked tokens keep their position; the cls token (and any register) is never masked.
Only the student has a mask token.

Shapes: B images, N patches (h * w), D embed dim, R register tokens, T = 1 + R + N tokens, d head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibot_engine.accel import apex_usable, nvidia_apex
from ibot_engine.model.attention import Packing, Rope, attend, make_packing, rotate


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
    # DINOv3's ViT-S+ (dinov3_vits16plus): ViT-S with a 6x feed-forward, which it runs as SwiGLU (model.ffn=swiglu).
    "vit_small_plus": ViTArch(384, 12, 6, 6.0),
}
INIT_SCHEMES = ("trunc_normal", "xavier")
POS_EMBEDS = ("learned", "rope")
FFNS = ("mlp", "swiglu")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa", sdpa_backend: str = "auto", *,
                 k_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend, self.sdpa_backend = backend, sdpa_backend
        self.k_bias = k_bias
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x: Tensor) -> Tensor:
        """The fused q, k, v projections [..., 3 * D]. Without `k_bias` the K third of the bias is replaced by zeros
        (DINOv3's `mask_k_bias`): the stored bias keeps its shape and name, and its K third gets no gradient."""
        if self.k_bias:
            return self.qkv(x)
        q_bias, k_bias, v_bias = self.qkv.bias.chunk(3)
        return F.linear(x, self.qkv.weight, torch.cat([q_bias, torch.zeros_like(k_bias), v_bias]))

    def forward(self, x: Tensor, packing: Packing | None = None, rope: Rope | None = None) -> Tensor:
        """x [B, T, D] (or packed [S, D] with `packing`) -> same shape; `rope` rotates q and k (see `attend`)."""
        return self.proj(attend(self.project_qkv(x), self.num_heads, self.backend, self.sdpa_backend, packing, rope))


def default_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


def norm_layer(impl: str, eps: float = 1e-6) -> Callable[[int], nn.Module]:
    """The LayerNorm factory (dim -> module) for `model.norm_impl` and `model.norm_eps`. Parameters are named
    weight / bias either way, so checkpoints move between the two; apex's FusedLayerNorm runs torch's kernel on CPU
    tensors."""
    if impl == "apex" and apex_usable("model.norm_impl", torch.device("cuda")):
        return partial(nvidia_apex().normalization.FusedLayerNorm, eps=eps)
    return default_norm if eps == 1e-6 else partial(nn.LayerNorm, eps=eps)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(hidden: int, align_to: int = 8) -> int:
    """DINOv3's SwiGLUFFN width for a nominal `hidden` (= dim * ffn ratio): two thirds of it (same parameter count
    as a GELU MLP of that width), rounded up to a multiple of `align_to`. ViT-S+: 384 * 6 -> 1536."""
    d = int(hidden * 2 / 3)
    return d + (-d % align_to)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), with DINOv3's SwiGLUFFN key names and width (`swiglu_hidden`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        width = swiglu_hidden(hidden)
        self.w1 = nn.Linear(dim, width)
        self.w2 = nn.Linear(dim, width)
        self.w3 = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


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
                 norm_layer: Callable[[int], nn.Module] | None = None, ffn: str = "mlp",
                 qkv_k_bias: bool = True) -> None:
        super().__init__()
        norm_layer = norm_layer or default_norm
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attention, sdpa_backend, k_bias=qkv_k_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = (SwiGLU if ffn == "swiglu" else Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.drop_path = drop_path
        self.drop_path_impl = drop_path_impl
        self.checkpointing = "none"  # none | full | selective, set by `ibot_engine.model.ibot.apply_train_options`

    def _attn_branch(self, x: Tensor, packing: Packing | None = None, rope: Rope | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), packing, rope))

    def _mlp_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward(self, x: Tensor, packing: Packing | None, rope: Rope | None) -> Tensor:
        if self.training and self.drop_path > 0 and self.drop_path_impl == "subset" and packing is None:
            # The rope tables are per token, shared by every sample: the kept subset uses them as they are.
            x = drop_add_subset(x, partial(self._attn_branch, rope=rope), self.drop_path)
            return drop_add_subset(x, self._mlp_branch, self.drop_path)
        x = x + drop_path(self._attn_branch(x, packing, rope), self.drop_path, self.training, packing)
        return x + drop_path(self._mlp_branch(x), self.drop_path, self.training, packing)

    def forward(self, x_BTD: Tensor, packing: Packing | None = None, rope: Rope | None = None) -> Tensor:
        """x [B, T, D], or the packed [S, D] tokens of several resolutions with `packing`; `rope`: the
        `VisionTransformer.rope_tables` of those tokens (None with learned position embeddings)."""
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self._forward(x_BTD, packing, rope)
        from torch.utils.checkpoint import checkpoint, noop_context_fn

        context_fn = _selective_context if self.checkpointing == "selective" else noop_context_fn
        # preserve_rng_state: the recomputation draws the same drop-path masks as the forward did.
        return checkpoint(self._forward, x_BTD, packing, rope, use_reentrant=False, context_fn=context_fn,
                          preserve_rng_state=True, **_CHECKPOINT_KWARGS)


class VisionTransformer(nn.Module):
    """ViT backbone: `forward(images, masks=None) -> tokens [B, 1 + R + N, D]` after the final LayerNorm.

    Token 0 is the cls token, tokens 1 .. R the registers, the patch tokens start at `num_prefix_tokens` (1 + R).
    """

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
        *,
        num_register_tokens: int = 0,
        pos_embed: str = "learned",
        rope_base: float = 100.0,
        norm_eps: float = 1e-6,
        ffn: str = "mlp",
        qkv_k_bias: bool = True,
    ) -> None:
        """Build the backbone; the keyword-only arguments are the `ModelConfig` fields of the same names.

        `norm_layer` (a dim -> module factory, e.g. `norm_layer(impl, eps)`) wins over `norm_eps` when given.
        """
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown model.arch {arch!r}; one of {sorted(ARCHS)}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"model.pos_embed={pos_embed!r}: one of {POS_EMBEDS}")
        if ffn not in FFNS:
            raise ValueError(f"model.ffn={ffn!r}: one of {FFNS}")
        if num_register_tokens < 0:
            raise ValueError(f"model.num_register_tokens={num_register_tokens} must be >= 0")
        a = ARCHS[arch]
        head_dim = a.embed_dim // a.num_heads
        if pos_embed == "rope" and head_dim % 4:
            raise ValueError(f"model.pos_embed=rope needs a head dim divisible by 4; {arch} has {head_dim}")
        self.arch, self.patch_size, self.embed_dim = arch, patch_size, a.embed_dim
        self.head_dim, self.rope_base = head_dim, rope_base
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.base_grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = nn.Conv2d(3, a.embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.embed_dim))
        if pos_embed == "learned":  # the cls token has a position too; registers have none (DINOv2 *_reg)
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.base_grid[0] * self.base_grid[1], a.embed_dim))
        else:  # RoPE has no weights: its periods follow from rope_base and the head dim (see rope_tables)
            self.register_parameter("pos_embed", None)
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, a.embed_dim))
        else:
            self.register_parameter("register_tokens", None)
        # Student only (the teacher never sees masked crops): zero-initialised as in the official `masked_embed`.
        self.mask_token = nn.Parameter(torch.zeros(1, a.embed_dim)) if mask_token else None
        # Stochastic depth: linear over depth from 0 (official iBOT / DINO), or the same rate in every block
        # (DINOv2's drop_path_uniform, lightly's example). linspace on the CPU: the model can be built on meta.
        rates = ([drop_path] * a.depth if drop_path_uniform
                 else torch.linspace(0, drop_path, a.depth, device="cpu").tolist())
        self.attention = attention
        norm_layer = norm_layer or (default_norm if norm_eps == 1e-6 else partial(nn.LayerNorm, eps=norm_eps))
        self.blocks = nn.ModuleList(
            Block(a.embed_dim, a.num_heads, a.mlp_ratio, r, layerscale, attention=attention,
                  sdpa_backend=sdpa_backend, drop_path_impl=drop_path_impl, norm_layer=norm_layer, ffn=ffn,
                  qkv_k_bias=qkv_k_bias)
            for r in rates
        )
        self.norm = norm_layer(a.embed_dim)
        self._resample_cache: dict[tuple[int, int, torch.device], Tensor] = {}
        self.init_weights(init)

    def init_weights(self, scheme: str = "trunc_normal") -> None:
        """`trunc_normal`: the official iBOT / DINO / timm init (every Linear N(0, 0.02) truncated, the patch
        embedding's conv PyTorch's default). `xavier`: the MAE init that lightly's iBOT uses (Xavier-uniform Linear
        layers and patch-embedding weight, cls token N(0, 0.02)). Both: position embedding N(0, 0.02) truncated, zero
        biases, LayerNorm 1 / 0, zero mask token; register tokens drawn like the cls token.

        The scales differ by 2-3x (Xavier gives std 0.05-0.07 at ViT-tiny widths): on short runs from scratch
        the larger init learns much faster (see docs/learning.md).
        """
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"model.init={scheme!r}: one of {INIT_SCHEMES}")
        if self.pos_embed is not None:
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
        if self.register_tokens is not None:  # last: the draws above are those of a backbone without registers
            if scheme == "xavier":
                nn.init.normal_(self.register_tokens, std=0.02)
            else:
                nn.init.trunc_normal_(self.register_tokens, std=0.02)

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
        """Position embedding [1, 1 + h*w, D] for an h x w patch grid (learned position embeddings only)."""
        if (h, w) == self.base_grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        patch_pos = self._resample_matrix(h, w, patch_pos.device) @ patch_pos.float()
        return torch.cat([cls_pos, patch_pos.to(self.pos_embed.dtype)[None]], dim=1)

    def rope_periods(self, device: torch.device | str = "cpu") -> Tensor:
        """DINOv3's RoPE periods [d / 4] fp32: rope_base ** (4 i / d). Computed, not stored (no state-dict key, no
        buffer to lose on a meta-device build or a dtype cast)."""
        return self.rope_base ** (2 * torch.arange(self.head_dim // 4, device=device, dtype=torch.float32)
                                  / (self.head_dim // 2))

    def rope_tables(self, grids: list[tuple[int, int, int]], device: torch.device) -> Rope | None:
        """RoPE (sin, cos) fp32 rows [sum of n * T, d] for `grids` of (count, h, w) crops laid out one after the
        other (T = 1 + R + h*w); None with learned position embeddings.

        DINOv3's RopePositionEmbedding with normalize_coords="separate": patch (i, j) sits at
        (2 (i + 0.5) / h - 1, 2 (j + 0.5) / w - 1); its angles are 2 pi coord / period for the row coordinate, then
        the column one ([d / 2]), tiled twice for the rotate-half layout. The prefix rows are sin 0, cos 1, which
        leaves those tokens exactly as they are, so every token can be rotated in one elementwise op (packed crops
        included). No train-time coordinate jitter (DINOv3's rescale_coords): eval and train see the same angles.
        """
        if self.pos_embed is not None:
            return None
        periods = self.rope_periods(device)
        sins, coss = [], []
        for n, h, w in grids:
            coords_h = torch.arange(0.5, h, device=device, dtype=torch.float32) / h
            coords_w = torch.arange(0.5, w, device=device, dtype=torch.float32) / w
            coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
            angles = (2 * math.pi * (2.0 * coords - 1.0)[:, :, None] / periods).flatten(1).tile(2)  # [h*w, d]
            prefix = angles.new_zeros(self.num_prefix_tokens, self.head_dim)
            sin = torch.cat([prefix, angles.sin()])
            cos = torch.cat([prefix + 1, angles.cos()])
            sins.append(sin.repeat(n, 1) if n > 1 else sin)
            coss.append(cos.repeat(n, 1) if n > 1 else cos)
        if len(sins) == 1:
            return sins[0], coss[0]
        return torch.cat(sins), torch.cat(coss)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """Tokens [B, 1 + R + N, D] entering the first block: patch embeddings (masked ones replaced by the mask
        token), the learned position embedding added to cls and patches, the registers inserted after cls."""
        x = self.patch_embed(images)  # [B, D, h, w]
        B, _, h, w = x.shape
        x_BND = x.flatten(2).transpose(1, 2)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given to a backbone built without a mask token (the teacher never masks)")
            x_BND = torch.where(masks.reshape(B, h * w, 1), self.mask_token.to(x_BND.dtype), x_BND)
        x_BTD = torch.cat([self.cls_token.expand(B, -1, -1).to(x_BND.dtype), x_BND], dim=1)
        if self.pos_embed is not None:
            x_BTD = x_BTD + self.pos_embed_for(h, w)
        if self.register_tokens is None:
            return x_BTD
        registers = self.register_tokens.expand(B, -1, -1).to(x_BTD.dtype)
        return torch.cat([x_BTD[:, :1], registers, x_BTD[:, 1:]], dim=1)

    def _grid(self, images: Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        x_BTD = self.prepare_tokens(images, masks)
        rope = self.rope_tables([(1, *self._grid(images))], x_BTD.device)
        for block in self.blocks:
            x_BTD = block(x_BTD, rope=rope)
        return self.norm(x_BTD)

    def forward_packed(self, inputs: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
        """`forward` of several batches of crops (e.g. global and local sizes) in one pass of packed tokens.

        inputs: (images [B_i, 3, H_i, W_i], masks [B_i, h_i, w_i] or None) per resolution group. Returns the tokens
        [B_i, 1 + R + N_i, D] of each group, as `forward` would (see `ibot_engine.model.attention` for the packing).
        """
        tokens = [self.prepare_tokens(images, masks) for images, masks in inputs]
        groups = tuple((t.shape[0], t.shape[1]) for t in tokens)
        packing = make_packing(groups, self.attention, tokens[0].device)
        rope = self.rope_tables([(t.shape[0], *self._grid(images)) for t, (images, _) in zip(tokens, inputs)],
                                tokens[0].device)
        x_SD = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])
        for block in self.blocks:
            x_SD = block(x_SD, packing, rope)
        x_SD = self.norm(x_SD)
        return [part.reshape(n, T, -1) for part, (n, T) in zip(x_SD.split([n * T for n, T in groups]), groups)]

    @torch.no_grad()
    def attention_maps(self, images: Tensor) -> Tensor:
        """Attention weights [B, H, T, T] of the last block (rows sum to 1), computed explicitly with what the
        kernels apply (RoPE, the zeroed K bias): for visualisation."""
        x_BTD = self.prepare_tokens(images)
        rope = self.rope_tables([(1, *self._grid(images))], x_BTD.device)
        for block in self.blocks[:-1]:
            x_BTD = block(x_BTD, rope=rope)
        attn = self.blocks[-1].attn
        B, T, D = x_BTD.shape
        qkv = attn.project_qkv(self.blocks[-1].norm1(x_BTD)).reshape(B, T, 3, attn.num_heads, D // attn.num_heads)
        q_BHTd, k_BHTd = qkv.permute(2, 0, 3, 1, 4)[:2]
        if rope is not None:
            q_BHTd, k_BHTd = rotate(q_BHTd, *rope), rotate(k_BHTd, *rope)
        return (q_BHTd @ k_BHTd.transpose(-2, -1) * (D // attn.num_heads) ** -0.5).softmax(dim=-1)
