"""The core attention the backend gives Megatron's layer spec: PyTorch's scaled_dot_product_attention, and for
packed rows (Megatron's `thd` layout) the project's packed attention (kernels/packed_attention.py).

Megatron's local `DotProductAttention` materialises float [b, heads, s, s] scores in a buffer it allocates on
the current CUDA device (megatron/core/transformer/dot_product_attention.py:189 ->
megatron/core/utils.py:631, `torch.cuda.current_device()`), so it cannot run on a CPU, and on a GPU it is what
ran out of memory at 8 x 2048 tokens (issue 22). SDPA takes the same [s, b, heads, d] query, key and value
(keys and values per group, as Megatron hands them over), applies the causal mask itself, and dispatches to a
flash or memory-efficient kernel on CUDA (bf16/fp16) and to its math kernel on a CPU. Same constructor and
`forward` signature as `DotProductAttention` (dot_product_attention.py:42-51, :142-151), so the spec can swap it in.
With context parallelism (`context_parallel_size` > 1) each rank holds two chunks of every row and attends to every
rank's keys and values (context.py).

Packed sequences: given `PackedSeqParams` with qkv_format "thd", Megatron's `Attention.forward` squeezes the batch
dimension out of query, key and value ([t, heads, d], transformer/attention.py:1066-1069), applies RoPE per
sequence with the boundaries (:1081-1118), hands the params to the core attention (:1150-1158), and reshapes what
comes back to [t, 1, heads * d] (:1189-1194). Here the boundaries (`cu_seqlens_q`, `max_seqlen_q`) go to
`attend_packed`: varlen flash attention on CUDA in bf16/fp16, causal SDPA per sequence elsewhere; no [t, t] mask.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from miles_stream.kernels.packed_attention import attend_packed, autocast_inputs
from miles_stream.trainer.megatron.context import cp_attention

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state
    from megatron.core.transformer.module import MegatronModule


class SdpaAttention(MegatronModule):  # type: ignore[misc]
    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        self.cp = config.context_parallel_size
        if self.cp > 1:  # the CP group (context.py): the layer's pg_collection's, else parallel_state's
            cp_group = getattr(pg_collection, "cp", None)
            self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
            self.cp_rank = dist.get_rank(group=self.cp_group)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """query [s, b, heads, d], key and value [s, b, groups, d] -> [s, b, heads * d] (causal); packed (thd):
        query [t, heads, d], key and value [t, groups, d] -> [t, heads * d], each sequence causal to itself."""
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("SdpaAttention is causal only: no attention mask or bias")
        query, key, value = autocast_inputs(query, key, value)  # q, k float32 out of the q/k norms under autocast
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        dropout = self.dropout if self.training else 0.0
        if self.cp > 1:  # this rank's two chunks of every row (context.py)
            return cp_attention(query, key, value, cp=self.cp, rank=self.cp_rank, group=self.cp_group,
                                scale=self.scale, dropout=dropout)  # fmt: skip
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True,
                                             dropout_p=dropout)  # fmt: skip
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, params: Any) -> Tensor:
        if params.qkv_format != "thd":
            raise ValueError(f"SdpaAttention packs sequences in the thd layout only, not {params.qkv_format!r}")
        if self.training and self.dropout > 0:
            raise ValueError("packed sequences take no attention dropout (set the model's attention_dropout 0)")
        padded = params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None
        same = params.cu_seqlens_kv is params.cu_seqlens_q or torch.equal(params.cu_seqlens_kv, params.cu_seqlens_q)
        if padded or not same:
            raise ValueError("SdpaAttention packs self-attention without padding: cu_seqlens_kv = cu_seqlens_q")
        out = attend_packed(query, key, value, params.cu_seqlens_q, int(params.max_seqlen_q), scale=self.scale)
        return out.reshape(out.shape[0], -1)
