"""The FP8 matmul on a GPU (cuBLAS's blockwise-scaled GEMM through F.scaled_mm) against the float reference,
and the quantizers on CUDA equal to the CPU's bit for bit. Needs compute capability >= 9.0 (H100/H200)."""

from __future__ import annotations

import pytest
import torch

from miles_stream.kernels.fp8 import (
    _scaled_mm_applies,
    dequantize_activation,
    dequantize_weight,
    fp8_matmul,
    quantize_activation,
    quantize_weight,
)

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HOPPER, reason="needs a CUDA device of capability >= 9.0")]


@pytest.mark.parametrize(("m", "k", "n"), [(1, 1024, 512), (16, 512, 1536), (200, 4096, 1024), (33, 128, 128)])
def test_scaled_mm_path_equals_the_reference_up_to_bf16_rounding(m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m + k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    xq, xs = quantize_activation(x.cuda())
    wq, ws = quantize_weight(w.cuda())
    cpu_x, cpu_w = quantize_activation(x), quantize_weight(w)
    assert torch.equal(xq.cpu().view(torch.uint8), cpu_x[0].view(torch.uint8)) and torch.equal(xs.cpu(), cpu_x[1])
    assert torch.equal(wq.cpu().view(torch.uint8), cpu_w[0].view(torch.uint8)) and torch.equal(ws.cpu(), cpu_w[1])
    assert _scaled_mm_applies(xq, wq, torch.bfloat16)
    out = fp8_matmul(xq, xs, wq, ws, out_dtype=torch.bfloat16).float().cpu()
    ref = dequantize_activation(*cpu_x) @ dequantize_weight(*cpu_w).T
    assert ((out - ref).abs() <= ref.abs() * 2**-7 + 1e-2).all()  # bf16's rounding of the output, float32 sums
