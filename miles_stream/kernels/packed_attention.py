"""Attention over packed rows: sequences side by side in one row, each attending causally to itself only.

`attend_packed` is the attention itself, over [L, heads, D] tensors and the sequences' boundaries (`cu_seqlens`,
int32 [n + 1], cumulative lengths; `max_len`, the longest). On CUDA in bf16/fp16 it runs PyTorch's variable-length
flash attention (`torch.nn.attention.varlen`): no [L, L] mask, no work across sequences. Elsewhere (CPU, float32)
it runs causal SDPA on each sequence, the reference. Two callers: the torch backend's Hugging Face models and the
Megatron backend's core attention (trainer/megatron/attention.py, Megatron's `thd` layout).

`packed_attention` is a Hugging Face attention function over it, registered as `NAME` by `use_packed_attention`.
It reads the boundaries from the keyword arguments transformers passes down to attention for variable-length
kernels: `cu_seq_lens_q` and `max_length_q`. The mask function of the same name builds nothing: the boundaries
are the mask.

Shapes (L packed tokens, H query heads, G key/value heads, H % G == 0, D head size):
    attend_packed:     q [L, H, D], k / v [L, G, D] -> [L, H, D]
    packed_attention:  query [1, H, L, D], key / value [1, G, L, D] -> output [1, L, H, D] (transformers' layout)
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # PyTorch before 2.9: the per-sequence path only
    _varlen_attn = None  # type: ignore[assignment]
varlen_attn: Any = _varlen_attn

NAME = "miles_packed"
_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters  # newer PyTorch


def use_packed_attention(model: Any) -> None:
    """Register the packed attention with transformers and switch `model` (and its sub-configs) to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    model.set_attn_implementation(NAME)


def packed_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    cu_seqlens, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None or max_len is None:
        raise ValueError("packed attention needs cu_seq_lens_q and max_length_q (trainer.pack_sequences)")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got {query.shape[0]}")
    if dropout > 0 or sliding_window is not None:
        raise ValueError("packed attention supports neither attention dropout nor sliding windows")
    q_LHD, k_LGD, v_LGD = (x[0].transpose(0, 1) for x in (query, key, value))
    return attend_packed(q_LHD, k_LGD, v_LGD, cu_seqlens, int(max_len), scale=scaling)[None], None


def attend_packed(q_LHD: Tensor, k_LGD: Tensor, v_LGD: Tensor, cu_seqlens: Tensor, max_len: int, *,
                  scale: float | None = None) -> Tensor:  # fmt: skip
    """[L, H, D]: each of the packed sequences attending causally to itself only (`scale` default 1/sqrt(D))."""
    if q_LHD.shape[1] % k_LGD.shape[1]:
        raise ValueError(f"{q_LHD.shape[1]} query heads are not a multiple of {k_LGD.shape[1]} key/value heads")
    q_LHD, k_LGD, v_LGD = autocast_inputs(q_LHD, k_LGD, v_LGD)
    if q_LHD.is_cuda and varlen_attn is not None and q_LHD.dtype in (torch.float16, torch.bfloat16):
        return _varlen(q_LHD, k_LGD, v_LGD, cu_seqlens, max_len, scale)
    return _per_sequence(q_LHD, k_LGD, v_LGD, cu_seqlens.tolist(), scale)


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Attention inputs in autocast's dtype where autocast is on: q and k come out of the q/k RMSNorms in float32
    under autocast (`aten::rms_norm` is on its float32 list; HF's norm upcasts through a float32 weight) while v is
    bf16; SDPA casts for itself, but the varlen kernel takes bf16/fp16 only and a mixed stack promotes to float32."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _varlen(q_LHD: Tensor, k_LGD: Tensor, v_LGD: Tensor, cu: Tensor, max_len: int, scale: float | None) -> Tensor:
    assert varlen_attn is not None
    heads = q_LHD.shape[1] // k_LGD.shape[1]
    extra: dict[str, Any] = {}
    if heads > 1 and _GQA:
        extra["enable_gqa"] = True
    elif heads > 1:  # this PyTorch's kernel wants as many key/value heads as query heads
        k_LGD, v_LGD = k_LGD.repeat_interleave(heads, 1), v_LGD.repeat_interleave(heads, 1)
    out = varlen_attn(q_LHD, k_LGD, v_LGD, cu.int(), cu.int(), max_len, max_len, scale=scale,
                      window_size=(-1, 0), **extra)  # fmt: skip  # (-1, 0): causal
    assert isinstance(out, Tensor)
    return out


def _per_sequence(q_LHD: Tensor, k_LGD: Tensor, v_LGD: Tensor, cu: list[int], scale: float | None) -> Tensor:
    if cu[0] != 0 or cu[-1] != q_LHD.shape[0]:  # checked here only: the varlen path never reads them on the host
        raise ValueError(f"the boundaries cover tokens {cu[0]}..{cu[-1]}, the row holds {q_LHD.shape[0]}")
    heads = q_LHD.shape[1] // k_LGD.shape[1]
    outs = []
    for start, end in itertools.pairwise(cu):
        q, k, v = (x[start:end].transpose(0, 1) for x in (q_LHD, k_LGD, v_LGD))
        if heads > 1:
            k, v = k.repeat_interleave(heads, 0), v.repeat_interleave(heads, 0)
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None
