"""The FP8 (blockwise e4m3) and INT4 (per-group, packed) quantizers against float64 on random data: scales
exactly amax / 448 (amax / 7), every value within the error its format allows, round trips exact, the matmul
within the bound the two quantized operands imply, partial blocks, and straight-through gradients."""

from __future__ import annotations

import pytest
import torch

from miles_stream.kernels.fp8 import (
    FP8,
    dequantize_activation,
    dequantize_weight,
    fp8_linear,
    fp8_linear_ste,
    fp8_matmul,
    quantize_activation,
    quantize_weight,
)
from miles_stream.kernels.int4 import dequantize_int4, fake_quantize_int4, int4_linear, quantize_int4

SHAPES = [(256, 384), (200, 72), (1, 130), (129, 257)]  # whole blocks, and partial ones at every edge


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a spread of magnitudes inside a block (exponents over several octaves), as weights and activations have
    return torch.randn(*shape, generator=g, dtype=torch.float64) * torch.exp(torch.randn(*shape, generator=g))


def block_amax(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    n, k = w.shape
    return torch.stack([torch.stack([w[i : i + rows, j : j + cols].abs().max() for j in range(0, k, cols)])
                        for i in range(0, n, rows)])  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_weight_scales_are_amax_over_448_and_values_within_e4m3_rounding(shape: tuple[int, int]) -> None:
    w = randn(*shape, seed=shape[0]).float()
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and q.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert torch.equal(scale, (block_amax(w.double(), 128, 128) / 448).float())  # exact, partial blocks too
    err = (dequantize_weight(q, scale).double() - w.double()).abs()
    big_scale = scale.double().repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    bound = w.double().abs() * 2**-4 * (1 + 2**-20) + big_scale * 2**-10  # 3 mantissa bits; subnormals
    assert (err <= bound).all()
    assert err.max() > 0  # it did quantize
    assert float(dequantize_weight(q, scale).abs().max()) == pytest.approx(float(w.abs().max()), rel=1e-6)


def test_fp8_activation_tiles_are_per_row_and_128_wide() -> None:
    x = randn(5, 300, seed=1).float()
    q, scale = quantize_activation(x)
    assert scale.shape == (5, 3)
    assert torch.equal(scale, (block_amax(x.double(), 1, 128) / 448).float())
    err = (dequantize_activation(q, scale).double() - x.double()).abs()
    assert (err <= x.double().abs() * 2**-4 * (1 + 2**-20) + scale.double().repeat_interleave(128, 1)[:, :300]
            * 2**-10).all()  # fmt: skip


def test_fp8_round_trip_is_exact_and_zero_blocks_stay_zero() -> None:
    w = randn(130, 260, seed=2).float()
    w[:128, :128] = 0
    q, scale = quantize_weight(w)
    assert scale[0, 0] == 1 and (dequantize_weight(q, scale)[:128, :128] == 0).all()
    q2, scale2 = quantize_weight(dequantize_weight(q, scale))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(scale2, scale)


@pytest.mark.parametrize(("m", "k", "n"), [(7, 256, 384), (3, 200, 130), (1, 64, 64)])
def test_fp8_matmul_is_within_the_bound_the_quantized_operands_imply(m: int, k: int, n: int) -> None:
    x, w = randn(m, k, seed=3), randn(n, k, seed=4)
    xq, xs = quantize_activation(x.float())
    wq, ws = quantize_weight(w.float())
    out = fp8_matmul(xq, xs, wq, ws, out_dtype=torch.float32)
    exact = x @ w.T
    # per product |x w| (2 * 2^-4 + 2^-8) from the two roundings, plus the subnormal terms and float32 sums
    bound = (x.abs() @ w.abs().T) * (2 * 2**-4 + 2**-8) + 1e-3
    assert ((out.double() - exact).abs() <= bound).all()
    assert (out.double() - exact).abs().max() > 1e-4  # not the unquantized product
    assert torch.equal(fp8_linear(x.float(), wq, ws), out)


def test_fp8_ste_forward_is_the_engine_path_and_gradients_go_straight_through() -> None:
    x = randn(2, 3, 160, seed=5).float().requires_grad_(True)
    w = randn(96, 160, seed=6).float().requires_grad_(True)
    out = fp8_linear_ste(x, w, torch.float32)
    wq, ws = quantize_weight(w.detach())
    assert torch.equal(out, fp8_linear(x.detach(), wq, ws))  # bit for bit what the engine computes
    g = randn(2, 3, 96, seed=7).float()
    out.backward(g)
    xq, xs = quantize_activation(x.detach())
    assert x.grad is not None and w.grad is not None
    assert torch.allclose(x.grad, g @ dequantize_weight(wq, ws), atol=1e-5)
    assert torch.allclose(w.grad, g.reshape(-1, 96).T @ dequantize_activation(xq, xs).reshape(-1, 160), atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 256), (33, 200), (4, 2, 130)])
def test_int4_scales_are_amax_over_7_and_values_within_half_a_step(shape: tuple[int, ...]) -> None:
    w = randn(*shape, seed=8).float()
    packed, scale = quantize_int4(w)
    k = shape[-1]
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], k // 2)
    flat = w.double().reshape(-1, k)
    amax = block_amax(flat, 1, 128)
    assert torch.equal(scale.reshape(-1, scale.shape[-1]), (amax / 7).float())
    deq = dequantize_int4(packed, scale)
    step = scale.double().repeat_interleave(128, -1)[..., :k]
    assert ((deq.double() - w.double()).abs() <= step / 2 * (1 + 1e-6)).all()
    codes = torch.round(deq.double() / step)
    assert codes.min() >= -8 and codes.max() <= 7 and (codes.abs() == 7).any()
    p2, s2 = quantize_int4(deq)
    assert torch.equal(p2, packed) and torch.allclose(s2, scale, rtol=1e-6, atol=0)


def test_int4_packs_the_even_index_low() -> None:
    w = torch.tensor([[7.0, -7.0, 0.0, 1.0]])
    packed, scale = quantize_int4(w)
    assert scale.item() == 1.0
    assert packed.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (0 + 8) | ((1 + 8) << 4)]]


def test_int4_refuses_an_odd_input_dim() -> None:
    with pytest.raises(ValueError, match="K even"):
        quantize_int4(torch.ones(4, 5))


def test_int4_linear_and_fake_quantization_agree_and_pass_gradients_through() -> None:
    x, w = randn(3, 256, seed=9).float(), randn(32, 256, seed=10).float().requires_grad_(True)
    packed, scale = quantize_int4(w.detach())
    fq = fake_quantize_int4(w)
    assert torch.equal(torch.nn.functional.linear(x, fq), int4_linear(x, packed, scale))
    fq.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones_like(w))
