"""The Triton kernel of `decode_attention.py`. Parameters carry no annotations: Triton reads them as types.

The G query heads of one KV head are padded to 16 rows so that both products run on the tensor cores
(`tl.dot` needs 16); the padding costs arithmetic, which is not what bounds this kernel, not bytes. Queries
are scaled and cast to the cache's dtype before the product (as flash kernels do); float32 caches get
full-precision products (a reference path), bf16 ones the tensor cores' own.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_S = 64  # positions per step of the loop


@triton.jit  # type: ignore[untyped-decorator]
def _decode_kernel(  # type: ignore[no-untyped-def]
    q, k, v, out, lengths, sq_b, sq_h, sq_g, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_g, scale, G,
    D: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(lengths + b)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    g_in = g < G
    qs = tl.load(q + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :], mask=g_in[:, None], other=0.0)
    qs = (qs.to(tl.float32) * scale).to(k.dtype.element_ty)  # [GP, D]: G query heads, zero rows up to GP
    m = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    k_row = k + b.to(tl.int64) * sk_b + h * sk_h
    v_row = v + b.to(tl.int64) * sv_b + h * sv_h
    for start in range(0, length, BLOCK):
        s = start + tl.arange(0, BLOCK)
        inside = s < length
        keys = tl.load(k_row + s[:, None] * sk_s + d[None, :], mask=inside[:, None], other=0.0)
        scores = tl.dot(qs, tl.trans(keys), input_precision=PRECISION)  # [GP, BLOCK] on the tensor cores
        scores = tl.where(inside[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        values = tl.load(v_row + s[:, None] * sv_s + d[None, :], mask=inside[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        total = total * rescale + tl.sum(p, axis=1)
        m = m_new
    result = acc / total[:, None]
    tl.store(out + b * so_b + h * so_h + g[:, None] * so_g + d[None, :], result.to(out.dtype.element_ty),
             mask=g_in[:, None])  # fmt: skip


def triton_decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float) -> Tensor:
    rows, heads, group, dim = q.shape
    assert k.shape[:2] == (rows, heads) and k.shape[3] == dim and v.shape == k.shape
    assert q.stride(3) == k.stride(3) == v.stride(3) == 1 and dim == triton.next_power_of_2(dim)
    out = torch.empty_like(q)
    _decode_kernel[(rows, heads)](
        q, k, v, out, lengths, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), scale, group,
        D=dim, GP=max(triton.next_power_of_2(group), 16), BLOCK=BLOCK_S, num_warps=4, num_stages=3,
        PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out
