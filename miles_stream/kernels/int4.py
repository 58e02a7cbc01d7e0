"""INT4 weight-only quantization (W4A16): symmetric, per group of 128 along the input dim, two values a byte.

    quantize_int4(w [..., N, K])       -> packed [..., N, K/2] uint8, scale [..., N, ceil(K/128)] float32
    dequantize_int4(packed, scale)     -> [..., N, K] float32
    fake_quantize_int4(w)              -> dequantize_int4(*quantize_int4(w)) in w's dtype, straight-through grad
    int4_linear(x [..., K], packed, scale) -> [..., N]    x @ deq(w).T in x's dtype (activations unquantized)

Each group of 128 consecutive input-dim values of a row has scale amax / 7 (float32); a value becomes
round(w / scale) (nearest-even) clamped to [-8, 7], stored as the nibble q + 8: the even input index in the
low four bits, the odd one in the high four. A group of zeros gets scale 1. A K that is not a multiple of 128
ends in a smaller group (its scale is its own amax; nothing padded in storage); K must be even (two a byte).
The error a value carries is at most scale / 2 = amax / 14 of its group.

The matmul is the dequantizing reference (unpack, scale, one matmul in x's dtype) on every device: a fused
Triton kernel for CUDA is not built (nothing here can run one), so the GPU path is this one, with no saving
in compute, only in the weights' memory (a quarter of bf16's plus the scales).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP = 128
QMAX = 7


def _groups(k: int) -> int:
    return -(-k // GROUP)


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """(packed [..., N, K/2] uint8, scale [..., N, ceil(K/128)] float32) of w [..., N, K], K even."""
    if w.ndim < 2 or w.shape[-1] % 2:
        raise ValueError(f"a weight [..., N, K] with K even expected (two values a byte), got {tuple(w.shape)}")
    k = w.shape[-1]
    g = _groups(k)
    w32 = w.float()
    amax = F.pad(w32.abs(), (0, g * GROUP - k)).reshape(*w.shape[:-1], g, GROUP).amax(dim=-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w32 / _expand(scale, k)).clamp(-QMAX - 1, QMAX).to(torch.int16) + 8
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
    return packed, scale


def dequantize_int4(packed: Tensor, scale: Tensor) -> Tensor:
    """[..., N, K] float32 from `quantize_int4`'s output."""
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.float32) - 8
    return q * _expand(scale, q.shape[-1])


def _expand(scale: Tensor, k: int) -> Tensor:
    return scale.repeat_interleave(GROUP, dim=-1)[..., :k]


def int4_linear(x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    """[..., N]: x times the dequantized weight, in x's dtype (W4A16: the activation is not quantized)."""
    return F.linear(x, dequantize_int4(packed, scale).to(x.dtype))


def fake_quantize_int4(w: Tensor) -> Tensor:
    """The weight the engine's INT4 layer computes with, in w's dtype; its gradient passes straight through
    (the quantizer counts as the identity in the backward pass)."""
    out: Tensor = _FakeInt4.apply(w)  # type: ignore[no-untyped-call]
    return out


class _FakeInt4(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        return dequantize_int4(*quantize_int4(w.detach())).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad
