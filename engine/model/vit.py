"""Vision Transformer backbone with an optional mask token (iBOT student) and cached position-embedding resampling.

Pre-norm ViT as in the official iBOT / DINO code: conv patch embedding, learned absolute position embedding
(bicubic-resampled for other grids), a cls token, `depth` blocks, final LayerNorm (eps 1e-6), qkv bias.
Attention goes through `F.scaled_dot_product_attention` (never an explicit softmax(QK^T)).

Masking (spec A.1, pitfall 2): masked patch embeddings are replaced by the learned mask token *before* the
position embedding is added, so masked tokens keep their position; the cls token is never masked. Only the
student has a mask token.

Shapes: B images, N patches (h * w), D embed dim, T = 1 + N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # flash / cuDNN / efficient: no T x T matrix
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


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


def drop_path(x_BTD: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x_BTD
    keep = x_BTD.new_empty(x_BTD.shape[0], 1, 1).bernoulli_(1.0 - p)
    return x_BTD * keep.div_(1.0 - p)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, layerscale: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_BTD = x_BTD + drop_path(self.ls1(self.attn(self.norm1(x_BTD))), self.drop_path, self.training)
        return x_BTD + drop_path(self.ls2(self.mlp(self.norm2(x_BTD))), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT backbone: `forward(images, masks=None) -> tokens [B, 1 + N, D]` after the final LayerNorm."""

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 16,
        img_size: int = 224,
        drop_path: float = 0.0,
        layerscale: float = 0.0,
        mask_token: bool = False,
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
        # Student only (pitfall 1): zero-initialised as in the official `masked_embed`.
        self.mask_token = nn.Parameter(torch.zeros(1, a.embed_dim)) if mask_token else None
        # Linear stochastic-depth schedule over depth (on the CPU, so the model can be built on the meta device).
        rates = torch.linspace(0, drop_path, a.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(a.embed_dim, a.num_heads, a.mlp_ratio, r, layerscale) for r in rates)
        self.norm = nn.LayerNorm(a.embed_dim, eps=1e-6)
        self._resample_cache: dict[tuple[int, int, torch.device], Tensor] = {}
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
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
