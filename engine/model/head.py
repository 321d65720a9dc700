"""iBOT projection head (the DINO head), shared between cls and patch tokens.

MLP D -> 2048 -> 2048 -> 256 (GELU, no norm), L2-normalisation, then a weight-normalised linear layer
256 -> K without bias: logits_k = g_k * <v_k / ||v_k||, z / ||z||>. With `norm_last_layer` the gains g are
frozen at 1, so logits are exact cosines in [-1, 1].

One head serves cls and patch tokens on both networks (the published recipes' `--shared_head true`). We avoid
a trap of the official code's defaults (bytedance/ibot `main_ibot.py`): with them the student projects patches
with a separate `last_layer2` that is never EMA'd into the teacher, while the teacher projects them with its cls layer.

The weight norm is written out (`weight_g`, `weight_v`) instead of `torch.nn.utils.weight_norm` (deprecated)
or its parametrize version (which renames the tensors), so freezing and EMA-by-name stay simple.

Shapes: R rows (tokens), D embed dim, K prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """weight = g * v / ||v|| per output row, no bias.

    v starts as `nn.Linear`'s default init, U(-1/sqrt(in), 1/sqrt(in)), as in the official DINO / iBOT head, which
    builds its last layer *after* applying trunc_normal(0.02) to the MLP. The scale of v matters although the
    forward divides it out: under AdamW each step moves every element of v by about lr, so a prototype turns by
    about lr / |v_ij| radians per step; the 0.02 init this code once used turned the prototypes 1.8x faster than
    the official head, which hastens their collapse onto one direction (uniform targets) in short runs.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # = nn.Linear's default: U(+-1/sqrt(in_dim))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))
        return F.linear(x, weight)


class IBOTHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x_RD: Tensor) -> Tensor:
        z = self.mlp(x_RD)
        # eps 1e-6 rather than 1e-12: the latter underflows in fp16 (spec D: NaN traced to fp16 F.normalize).
        z = F.normalize(z, dim=-1, eps=1e-6)
        return self.last_layer(z)
