"""Blockwise FP8 (e4m3) quantization, the DeepSeek-V3 recipe, and the matmul over it.

    quantize_weight(w [..., N, K])  -> q [..., N, K] float8_e4m3fn, scale [..., ceil(N/128), ceil(K/128)] float32
    quantize_activation(x [..., K]) -> q [..., K] float8_e4m3fn,    scale [..., ceil(K/128)] float32
    dequantize_weight(q, scale) / dequantize_activation(q, scale) -> float32
    fp8_matmul(xq [M, K], xs, wq [N, K], ws, out_dtype) -> [M, N]       x @ w.T over the quantized operands
    fp8_linear(x [..., K], wq, ws)                      -> [..., N]     the activation quantized, then fp8_matmul
    fp8_linear_ste(x, w, dtype)                         -> [..., N]     the same from full-precision w (trainer)

Weights are scaled per 128x128 block, activations per 1x128 tile along the reduction dimension K (per token),
each scale amax / 448 in float32 (448: e4m3's largest finite value), so a block's largest element maps to
+-448. Partial blocks: a dimension that is not a multiple of 128 ends in one smaller block whose scale is the
amax of its real elements; nothing is padded in storage (the scale tensors round up). A block of zeros gets
scale 1 (its values are zeros either way). Values are divided by their block's scale in float32 and rounded
to nearest-even by the cast (clamped to +-448 first, against a quotient that rounds past it).

The error a value carries is e4m3's rounding: 3 mantissa bits, at most 2^-4 of |value| for normal numbers
and 2^-10 * scale (half of the subnormal spacing 2^-9) below e4m3's smallest normal 2^-6 * scale.

The matmul: on CPU (and wherever the fast path does not apply) the float reference: both operands
dequantized to float32 and multiplied in float32. On CUDA with compute capability >= 9.0, K and N multiples
of 128 and a bfloat16 output, PyTorch's blockwise-scaled GEMM (`F.scaled_mm`, cuBLAS): A scaled 1x128 and B
128x128, the recipe PyTorch calls BLOCK_1x128_128x128 (aten/src/ATen/native/cuda/ScaledBlas.cpp,
_scaled_block1x128_block128x128: scale_a [M, K/128] outer-dim-major, scale_b [K/128, N/128] whose transpose
is contiguous). That path has NOT run here (no GPU in this session): tests/unit/test_fp8_gpu.py checks it
against the reference where a GPU is.

`fp8_linear_ste` is what the trainer runs: the identical quantization of the weight (taken in the compute
dtype) and of the activation, the same matmul, and straight-through gradients: the quantizers count as the
identity in the backward pass, so d x = d y @ deq(w) and d w = d y.T @ deq(x), in float32. The backward GEMMs
are not FP8 (Transformer Engine's FP8 backward is not built).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _scale_of(amax: Tensor) -> Tensor:
    """amax / 448 in float32; 1 for an all-zero block. Divided by a tensor on amax's device, not the Python number:
    CUDA divides by a CPU scalar as a multiply by its reciprocal (aten's div_true kernel), one ulp off the CPU's
    quotient at times (seen on an H100 in session 17: tests/unit/test_fp8_gpu.py failed on the scales; the fix was
    not run on a GPU), and the quantizers must agree bit for bit across devices."""
    return torch.where(amax > 0, amax / amax.new_tensor(FP8_MAX), torch.ones_like(amax))


def _to_fp8(values: Tensor, scale: Tensor) -> Tensor:
    return (values / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _expand(scale: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """A per-block scale repeated over its block's elements along the last len(sizes) dims, cut to `sizes`."""
    for i, size in enumerate(sizes):
        dim = scale.ndim - len(sizes) + i
        scale = scale.repeat_interleave(BLOCK, dim=dim).narrow(dim, 0, size)
    return scale


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q [..., N, K] e4m3, scale [..., ceil(N/128), ceil(K/128)] float32): one scale per 128x128 block of the
    last two dims (leading dims, e.g. MoE experts, are quantized each on its own)."""
    if w.ndim < 2:
        raise ValueError(f"a weight [..., N, K] expected, got shape {tuple(w.shape)}")
    n, k = w.shape[-2:]
    nb, kb = _blocks(n), _blocks(k)
    w32 = w.float()
    padded = F.pad(w32.abs(), (0, kb * BLOCK - k, 0, nb * BLOCK - n))
    amax = padded.reshape(*w.shape[:-2], nb, BLOCK, kb, BLOCK).amax(dim=(-3, -1))
    scale = _scale_of(amax)
    return _to_fp8(w32, _expand(scale, (n, k))), scale


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """(q [..., K] e4m3, scale [..., ceil(K/128)] float32): one scale per 1x128 tile of the last dim."""
    k = x.shape[-1]
    kb = _blocks(k)
    x32 = x.float()
    amax = F.pad(x32.abs(), (0, kb * BLOCK - k)).reshape(*x.shape[:-1], kb, BLOCK).amax(dim=-1)
    scale = _scale_of(amax)
    return _to_fp8(x32, _expand(scale, (k,))), scale


def dequantize_weight(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * _expand(scale, tuple(q.shape[-2:]))


def dequantize_activation(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * _expand(scale, (q.shape[-1],))


def fp8_matmul(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, *, out_dtype: torch.dtype) -> Tensor:
    """[M, N] = deq(xq, xs) @ deq(wq, ws).T, in out_dtype; xq [M, K] with xs [M, ceil(K/128)], wq [N, K]."""
    if xq.ndim != 2 or wq.ndim != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq [M, K] and wq [N, K] expected, got {tuple(xq.shape)} and {tuple(wq.shape)}")
    if _scaled_mm_applies(xq, wq, out_dtype):
        return _scaled_mm(xq, xs, wq, ws, out_dtype)
    with torch.autocast(xq.device.type, enabled=False):
        return (dequantize_activation(xq, xs) @ dequantize_weight(wq, ws).T).to(out_dtype)


def _scaled_mm_applies(xq: Tensor, wq: Tensor, out_dtype: torch.dtype) -> bool:
    if not xq.is_cuda or out_dtype != torch.bfloat16 or not hasattr(F, "scaled_mm"):
        return False
    n, k = wq.shape
    return k % BLOCK == 0 and n % BLOCK == 0 and torch.cuda.get_device_capability(xq.device) >= (9, 0)


def _scaled_mm(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor, out_dtype: torch.dtype) -> Tensor:
    """cuBLAS's blockwise FP8 GEMM (unrun here). Layouts as ScaledBlas.cpp checks them: A row-major, B = wq.T
    column-major; scale_a [M, K/128] with strides (1, M); scale_b [K/128, N/128] = ws.T."""
    recipe: Any = F.ScalingType
    scale_a = xs.t().contiguous().t()
    out: Tensor = F.scaled_mm(xq, wq.t(), scale_a, recipe.BlockWise1x128, ws.t(), recipe.BlockWise128x128,
                              output_dtype=out_dtype)  # fmt: skip
    return out


def fp8_linear(x: Tensor, wq: Tensor, ws: Tensor, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """[..., N]: x [..., K] quantized per 1x128 tile, times the quantized weight wq [N, K]; out in x's dtype
    unless `out_dtype`."""
    xq, xs = quantize_activation(x.reshape(-1, x.shape[-1]))
    out = fp8_matmul(xq, xs, wq, ws, out_dtype=out_dtype or x.dtype)
    return out.reshape(*x.shape[:-1], wq.shape[0])


def fp8_linear_ste(x: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8_linear of x and w, both taken in `dtype` (the compute dtype) and quantized as the engine quantizes
    them, output in `dtype`; straight-through gradients for x and w (in their own dtypes)."""
    out: Tensor = _Fp8LinearSte.apply(x, w, dtype)  # type: ignore[no-untyped-call]
    return out


class _Fp8LinearSte(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            wq, ws = quantize_weight(w.detach().to(dtype))
            xq, xs = quantize_activation(x.detach().to(dtype).reshape(-1, x.shape[-1]))
            out = fp8_matmul(xq, xs, wq, ws, out_dtype=dtype)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, w.dtype
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        xq, xs, wq, ws = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).float()
            grad_x = (g @ dequantize_weight(wq, ws)).to(ctx.x_dtype).reshape(ctx.x_shape)
            grad_w = (g.T @ dequantize_activation(xq, xs)).to(ctx.w_dtype)
        return grad_x, grad_w, None
