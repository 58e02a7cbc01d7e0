"""Triton kernels for `logprobs.py`: one pass over each row of a chunk's logits, on CUDA.

row_stats: one program per row, streaming the vocabulary in blocks with an online (rescaled) maximum, sums
    s = sum exp(z - m) and u = sum exp(z - m) * z in float32; then logsumexp = m + log s, sum(p z) = u / s,
    and the target's z. Reads the row once; writes three floats.
row_grads: one program per row: p = exp(z - logsumexp), d z = g_lp ([j = target] - p) - g_ent p (z - sum(p z)),
    times 1 / T, written over the logits in place. Reads and writes the row once.

The kernels' parameters carry no annotations: Triton reads annotations as kernel types.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_V = 4096  # vocabulary entries per step of a row


@triton.jit  # type: ignore[untyped-decorator]
def _stats_kernel(logits, stride, targets, lse, mean_z, target_z, vocab, inv_t, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0)
    base = logits + row.to(tl.int64) * stride
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        z = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * scale + tl.sum(e, axis=0)
        u = u * scale + tl.sum(tl.where(inside, e * z, 0.0), axis=0)
        m = m_new
    target = tl.load(targets + row)
    tl.store(lse + row, m + tl.log(s))
    tl.store(mean_z + row, u / s)
    tl.store(target_z + row, tl.load(base + target).to(tl.float32) * inv_t)


@triton.jit  # type: ignore[untyped-decorator]
def _grads_kernel(logits, stride, targets, lse, mean_z, g_lp, g_ent, vocab, inv_t, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0)
    base = logits + row.to(tl.int64) * stride
    target = tl.load(targets + row)
    row_lse = tl.load(lse + row)
    row_mean = tl.load(mean_z + row)
    glp = tl.load(g_lp + row)
    gent = tl.load(g_ent + row)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - row_lse)
        grad = -glp * p - gent * p * (z - row_mean)
        grad = tl.where(cols == target, grad + glp, grad) * inv_t
        tl.store(base + cols, grad.to(logits.dtype.element_ty), mask=inside)


def row_stats(logits: Tensor, targets: Tensor, inv_t: float, lse: Tensor, mean_z: Tensor, target_z: Tensor) -> None:
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and all(t.is_contiguous() for t in (targets, lse, mean_z, target_z))
    _stats_kernel[(rows,)](logits, logits.stride(0), targets, lse, mean_z, target_z, vocab, inv_t, BLOCK=BLOCK_V,
                           num_warps=8)  # fmt: skip


def row_grads(
    logits: Tensor, targets: Tensor, inv_t: float, lse: Tensor, mean_z: Tensor, g_lp: Tensor, g_ent: Tensor
) -> None:
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and all(t.is_contiguous() for t in (targets, lse, mean_z, g_lp, g_ent))
    _grads_kernel[(rows,)](logits, logits.stride(0), targets, lse, mean_z, g_lp, g_ent, vocab, inv_t, BLOCK=BLOCK_V,
                           num_warps=8)  # fmt: skip


def available() -> bool:
    return torch.cuda.is_available()
