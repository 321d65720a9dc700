"""Attention backends for the ViT and packing of several crop resolutions into one token sequence.

`model.attention` picks the kernel; every backend computes softmax(q k^T / sqrt(d)) v per sequence and never
materialises a T x T matrix on the GPU:

* `sdpa` (default): `F.scaled_dot_product_attention`. PyTorch picks cuDNN / Flash / memory-efficient per call;
  `model.sdpa_backend` forces one (`torch.nn.attention.sdpa_kernel`) for experiments.
* `xformers`: `xformers.ops.memory_efficient_attention` (optional extra, detected at run time; it has no CPU
  operator, so it needs a CUDA build that matches the installed torch).
* `flex`: `torch.nn.attention.flex_attention`, compiled on CUDA (eager flex is a slow reference). It has no CPU
  backward in torch 2.14, so on CPU it serves forward-only passes (the teacher, evaluation).

Packing (`model.pack_crops`): the student's global and local crops (197 and 37 tokens at 224 / 96 px, ViT/16)
travel through the blocks as ONE flat token tensor [S, D], S = sum of n_i * T_i over the resolution groups, so
every token-wise op (LayerNorm, qkv, proj, MLP, residuals) is one kernel launch over all crops instead of one per
resolution. Attention stays within each crop: `sdpa` runs one call per resolution group on views of the packed
rows, `flex` one call with a block-diagonal (document) mask, `xformers` one call with a `BlockDiagonalMask`.

RoPE (`model.pos_embed=rope`): `attend` rotates q and k by per-token (sin, cos) tables (`Rope`, built by
`VisionTransformer.rope_tables`; prefix tokens have the identity rows) before any backend sees them, so every
backend and the packing serve it unchanged.

Shapes: B sequences, T tokens, H heads, d head dim, D = H * d, S packed tokens.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers", "flex")
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
_CPU_SDPA_BACKENDS = ("auto", "flash", "math")  # the SDPA kernels PyTorch has for CPU tensors


Rope = tuple[Tensor, Tensor]
"""RoPE (sin, cos) fp32 tables [T, d] of one sequence (or [S, d] of the packed rows), rotate-half layout."""


def rotate(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """RoPE of x [..., T, d] (rotate-half layout: the pair of x_i is x_{i + d/2}) with tables broadcastable to it.

    As DINOv3's `rope_apply`: computed in the tables' fp32 whatever x's dtype, then cast back to x's dtype."""
    x_dtype = x.dtype
    x = x.to(sin.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x_dtype)


class Packing(NamedTuple):
    """How a packed [S, D] token tensor splits into sequences: `groups` of (count, tokens per sequence).

    `sample` maps each packed token to its sequence (stochastic depth draws per sequence); `block_mask` is the
    flex backend's block-diagonal mask and `xformers_bias` the xformers one (None for the other backends).
    """

    groups: tuple[tuple[int, int], ...]
    sample: Tensor  # [S] int64
    block_mask: Any = None
    xformers_bias: Any = None

    @property
    def num_sequences(self) -> int:
        return sum(n for n, _ in self.groups)


@functools.cache
def _xformers_ops() -> Any:
    try:
        ops = importlib.import_module("xformers.ops")
        ops.memory_efficient_attention  # noqa: B018  (present only in builds with the operator)
    except (ImportError, AttributeError) as err:
        raise RuntimeError(
            f"model.attention=xformers needs xformers with its CUDA operators (pip install 'ibot-engine[xformers]', "
            f"a build matching torch {torch.__version__}): {err}"
        ) from err
    return ops


def check_attention(backend: str, sdpa_backend: str, device: torch.device) -> None:
    """Fail before any work when the requested kernel cannot run on `device`."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention={backend!r}: one of {ATTENTION_BACKENDS}")
    if sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"model.sdpa_backend={sdpa_backend!r}: one of {SDPA_BACKENDS}")
    if backend == "sdpa" and device.type == "cpu" and sdpa_backend not in _CPU_SDPA_BACKENDS:
        raise ValueError(f"model.sdpa_backend={sdpa_backend} has no CPU kernel; on CPU use one of {_CPU_SDPA_BACKENDS}")
    if backend == "xformers":
        _xformers_ops()
        if device.type != "cuda":
            raise ValueError("model.attention=xformers runs on CUDA only (xformers has no CPU operator)")


@functools.cache
def _sdpa_context(sdpa_backend: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[sdpa_backend]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, sdpa_backend: str) -> Tensor:
    """q, k, v [B, H, T, d] -> [B, H, T, d]."""
    if sdpa_backend == "auto":
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_context(sdpa_backend)):
        return F.scaled_dot_product_attention(q, k, v)


@functools.cache
def _flex_fn(device_type: str) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex is a reference implementation (materialises scores); compiled, it is a fused Triton kernel.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def attend(qkv: Tensor, num_heads: int, backend: str, sdpa_backend: str = "auto",
           packing: Packing | None = None, rope: Rope | None = None) -> Tensor:
    """Multi-head attention from fused projections.

    qkv: [B, T, 3 * D] (one sequence per row), or [S, 3 * D] packed rows with `packing`. Returns [B, T, D] or [S, D].
    rope: (sin, cos) [T, d] (or [S, d] with `packing`): q and k are rotated by them first.
    """
    if packing is None:
        B, T, threeD = qkv.shape
        d = threeD // (3 * num_heads)
        if backend == "xformers":  # [B, T, H, d] layout, no transposes
            q, k, v = qkv.reshape(B, T, 3, num_heads, d).unbind(2)
            if rope is not None:
                sin, cos = rope[0][:, None], rope[1][:, None]  # [T, 1, d]: broadcast over heads
                q, k = rotate(q, sin, cos), rotate(k, sin, cos)
            return _xformers_ops().memory_efficient_attention(q, k, v).reshape(B, T, num_heads * d)
        q, k, v = qkv.reshape(B, T, 3, num_heads, d).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, d]
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if backend == "flex":
            out = _flex_fn(qkv.device.type)(q, k, v)
        else:
            out = _sdpa(q, k, v, sdpa_backend)
        return out.transpose(1, 2).reshape(B, T, num_heads * d)
    S, threeD = qkv.shape
    d = threeD // (3 * num_heads)
    if backend == "sdpa":  # one call per resolution group, on row views of the packed tensor
        outs, start = [], 0
        for n, T in packing.groups:
            rows = qkv[start : start + n * T]
            # Every sequence of a group has the same table: its first T rows.
            rope_g = None if rope is None else (rope[0][start : start + T], rope[1][start : start + T])
            outs.append(attend(rows.reshape(n, T, threeD), num_heads, backend, sdpa_backend, rope=rope_g)
                        .reshape(n * T, -1))
            start += n * T
        return torch.cat(outs)
    if backend == "xformers":
        q, k, v = qkv.reshape(1, S, 3, num_heads, d).unbind(2)
        if rope is not None:
            sin, cos = rope[0][:, None], rope[1][:, None]  # [S, 1, d]
            q, k = rotate(q, sin, cos), rotate(k, sin, cos)
        out = _xformers_ops().memory_efficient_attention(q, k, v, attn_bias=packing.xformers_bias)
        return out.reshape(S, num_heads * d)
    q, k, v = qkv.reshape(1, S, 3, num_heads, d).permute(2, 0, 3, 1, 4)  # 3 x [1, H, S, d]
    if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
    out = _flex_fn(qkv.device.type)(q, k, v, block_mask=packing.block_mask)
    return out.transpose(1, 2).reshape(S, num_heads * d)


@functools.lru_cache(maxsize=64)  # layouts are few (one per crop recipe and batch): masks are built once
def make_packing(groups: tuple[tuple[int, int], ...], backend: str, device: torch.device) -> Packing:
    """The packing of `groups` (count, tokens per sequence) for `backend`, cached: a batch layout repeats every step."""
    counts = torch.tensor([T for n, T in groups for _ in range(n)], device=device)
    sample = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    block_mask = xformers_bias = None
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_sequence(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return sample[q_idx] == sample[kv_idx]

        S = sample.numel()
        block_mask = create_block_mask(same_sequence, None, None, S, S, device=str(device))
    elif backend == "xformers":
        fmha = importlib.import_module("xformers.ops.fmha")
        xformers_bias = fmha.BlockDiagonalMask.from_seqlens(counts.tolist())
    return Packing(groups, sample, block_mask, xformers_bias)
