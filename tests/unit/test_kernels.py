"""Token logprobs and entropy without the logits: the chunked path equals the full-logits one, values and
gradients, on CPU (float64 and float32) and, where a GPU is present, the Triton path in bf16."""

from __future__ import annotations

import pytest
import torch

from miles_stream.kernels import naive_token_logprobs, token_logprobs


def inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 3  # logits of a few units, as in LMs
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_values_equal_the_full_logits_path_in_float64(temperature: float, chunk: int) -> None:
    hidden, weight, targets = inputs(37, 16, 101, torch.float64, seed=chunk)
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, chunk=chunk)
    ref_logp, ref_entropy = naive_token_logprobs(hidden, weight, targets, temperature=temperature)
    assert logp.dtype == torch.float64
    assert torch.allclose(logp, ref_logp, rtol=0, atol=1e-12)
    assert torch.allclose(entropy, ref_entropy, rtol=0, atol=1e-12)
    assert (logp <= 0).all() and (entropy >= 0).all()


def test_gradients_pass_gradcheck_through_both_outputs() -> None:
    hidden, weight, targets = inputs(9, 5, 13, torch.float64, seed=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fn = lambda h, w: token_logprobs(h, w, targets, temperature=0.8, chunk=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("use", ["logp", "entropy", "both"])
def test_float32_gradients_match_the_full_logits_path(use: str) -> None:
    hidden, weight, targets = inputs(50, 32, 300, torch.float32, seed=5)
    up = torch.randn(2, 50, generator=torch.Generator().manual_seed(9))
    grads = []
    for fn in (lambda h, w: token_logprobs(h, w, targets, temperature=0.9, chunk=16),
               lambda h, w: naive_token_logprobs(h, w, targets, temperature=0.9)):  # fmt: skip
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, entropy = fn(h, w)
        loss = {"logp": (logp * up[0]).sum(), "entropy": (entropy * up[1]).sum()}
        total = sum(loss.values()) if use == "both" else loss[use]
        total.backward()  # type: ignore[union-attr]
        grads.append((h.grad, w.grad))
    (gh, gw), (rh, rw) = grads
    assert gh is not None and gw is not None and rh is not None and rw is not None
    assert rel(gh, rh) < 1e-5 and rel(gw, rw) < 1e-5


def test_bf16_inputs_stay_close_to_the_float64_result() -> None:
    hidden, weight, targets = inputs(64, 64, 1000, torch.float64, seed=7)
    logp, entropy = token_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, chunk=10)
    ref_logp, ref_entropy = naive_token_logprobs(hidden, weight, targets)
    assert logp.dtype == torch.float32
    assert rel(logp, ref_logp) < 1e-2 and rel(entropy, ref_entropy) < 1e-2


def test_bad_shapes_and_temperatures_are_refused() -> None:
    hidden, weight, targets = inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_triton_path_in_bf16_matches_float64_values_and_gradients(temperature: float) -> None:
    hidden, weight, targets = inputs(1000, 256, 32_000, torch.bfloat16, device="cuda", seed=11)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = token_logprobs(h, w, targets, temperature=temperature, chunk=300)
    up = torch.randn(2, 1000, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ((logp * up[0]).sum() + (entropy * up[1]).sum()).backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_logp, ref_entropy = naive_token_logprobs(h64, w64, targets, temperature=temperature)
    ((ref_logp * up[0].double()).sum() + (ref_entropy * up[1].double()).sum()).backward()
    assert h.grad is not None and w.grad is not None and h64.grad is not None and w64.grad is not None
    assert torch.isfinite(logp).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert rel(logp, ref_logp) < 1e-2 and rel(entropy, ref_entropy) < 1e-2  # bf16 operands: 1e-3 to 1e-2
    assert rel(h.grad, h64.grad) < 2e-2 and rel(w.grad, w64.grad) < 2e-2


def decode_inputs(device: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(5, 2, 4, 32, generator=g)  # 5 rows, 2 KV heads, 4 query heads each, head dim 32
    cache = torch.randn(2, 5, 2, 70, 32, generator=g)  # k and v, 70 positions allocated
    lengths = torch.tensor([1, 7, 33, 64, 70])
    return q.to(device, dtype), cache[0].to(device, dtype), cache[1].to(device, dtype), lengths.to(device)


def decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(q, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        scores = q[b].double() @ k[b, :, :n].double().transpose(-1, -2) * 0.2  # [H, G, n]
        out[b] = torch.softmax(scores, -1) @ v[b, :, :n].double()
    return out


def test_decode_attention_reads_each_row_up_to_its_length() -> None:
    from miles_stream.kernels.decode_attention import decode_attention

    q, k, v, lengths = decode_inputs("cpu", torch.float32)
    out = decode_attention(q, k, v, lengths, scale=0.2)
    assert rel(out, decode_reference(q, k, v, lengths)) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_attention_matches_float64(dtype: torch.dtype) -> None:
    from miles_stream.kernels.decode_attention import decode_attention

    q, k, v, lengths = decode_inputs("cuda", dtype, seed=4)
    out = decode_attention(q, k[:, :, :], v, lengths, scale=0.2)
    assert rel(out, decode_reference(q, k, v, lengths)) < (1e-5 if dtype == torch.float32 else 1e-2)
    strided = torch.zeros(5, 2, 96, 32, device="cuda", dtype=dtype)[:, :, :70]  # a slice of a larger cache
    strided.copy_(k)
    assert rel(decode_attention(q, strided, v, lengths, scale=0.2), decode_reference(q, k, v, lengths)) < 1e-2
    k[:4, :, 69] = float("nan")  # past the length of every row but the last: never read
    assert torch.isfinite(decode_attention(q, k, v, lengths, scale=0.2)).all()


def packed_case(device: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Three sequences (5, 1 and 9 tokens) packed in one row; 4 query heads over 2 key/value heads."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, h, 15, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    return *(x.to(device, dtype).requires_grad_() for x in (q, k, v)), cu.to(device)


def packed_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Dense attention in float64 under a block-diagonal causal mask; [1, L, H, D] like transformers."""
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).cpu())
    pos = torch.arange(len(seq))
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    k2, v2 = (x.double().repeat_interleave(2, 1) for x in (k, v))
    scores = (q.double() @ k2.transpose(-1, -2) * 0.25).masked_fill(~allowed.to(q.device), float("-inf"))
    return (torch.softmax(scores, -1) @ v2).transpose(1, 2)


def check_packed(device: str, dtype: torch.dtype, tol: float) -> None:
    from miles_stream.kernels.packed_attention import packed_attention

    q, k, v, cu = packed_case(device, dtype)
    out, _ = packed_attention(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, max_length_q=9)
    ref = packed_reference(q, k, v, cu)
    assert out.shape == (1, 15, 4, 16)
    assert rel(out.detach(), ref.detach()) < tol
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < tol * 2


def test_packed_attention_keeps_sequences_apart_on_cpu() -> None:
    check_packed("cpu", torch.float64, 1e-10)


def test_packed_attention_refuses_what_it_cannot_do() -> None:
    from miles_stream.kernels.packed_attention import attend_packed, packed_attention

    q, k, v, cu = packed_case("cpu", torch.float32)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_attention(None, q, k, v, None)
    with pytest.raises(ValueError, match="sliding"):
        packed_attention(None, q, k, v, None, sliding_window=4, cu_seq_lens_q=cu, max_length_q=9)
    q_LHD, k_LGD, v_LGD = (x[0].transpose(0, 1) for x in (q, k, v))  # attend_packed's layout (the Megatron backend's)
    with pytest.raises(ValueError, match=r"cover tokens 0\.\.14, the row holds 15"):
        attend_packed(q_LHD, k_LGD, v_LGD, torch.tensor([0, 5, 14], dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3"):
        attend_packed(q_LHD, torch.cat([k_LGD, k_LGD[:, :1]], 1), v_LGD, cu, 9)


def test_packed_attention_takes_its_inputs_in_autocasts_dtype() -> None:
    """Under autocast q and k leave the q/k norms in float32 and v in bf16: the kernel gets all three in bf16
    (the varlen kernel takes bf16/fp16 only); outside autocast they stay as they are."""
    from miles_stream.kernels.packed_attention import autocast_inputs

    q, k, v = torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)
    assert [t.dtype for t in autocast_inputs(q, k, v)] == [torch.float32, torch.float32, torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in autocast_inputs(q, k, v)] == [torch.bfloat16] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_varlen_flash_attention_matches_the_block_diagonal_reference() -> None:
    check_packed("cuda", torch.bfloat16, 2e-2)
