"""Attention of one new token per row over that row's KV cache, with grouped query heads (decode).

    decode_attention(q [B, H_kv, G, D], k, v [B, H_kv, S, D] (any strides, last dim contiguous),
                     lengths [B] int) -> [B, H_kv, G, D]
    out[b, h, g] = softmax(q[b, h, g] . k[b, h, :lengths[b]] * scale) @ v[b, h, :lengths[b]]

One Triton program per (row, KV head) streams that head's keys and values once, in blocks of positions, with
an online softmax for its G query heads, and stops at the row's length: the bytes moved are the cache
actually in use, which is what bounds decoding. On an H100 (bench/bench_engine.py's profile, 128 rows of 256-320
positions) it takes 57 us a layer, against 119 us for PyTorch's fused attention given a mask over the 512
allocated positions. Elsewhere (CPU) the same function runs as masked `scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float) -> Tensor:
    if q.is_cuda:
        from miles_stream.kernels.triton_decode import triton_decode_attention

        return triton_decode_attention(q, k, v, lengths, scale)
    visible = torch.arange(k.shape[2], device=k.device)[None, :] < lengths[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)
