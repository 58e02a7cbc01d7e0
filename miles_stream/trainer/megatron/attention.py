"""The core attention the backend gives Megatron's layer spec: PyTorch's scaled_dot_product_attention.

Megatron's local `DotProductAttention` materialises float [b, heads, s, s] scores in a buffer it allocates on
the current CUDA device (megatron/core/transformer/dot_product_attention.py:189 ->
megatron/core/utils.py:631, `torch.cuda.current_device()`), so it cannot run on a CPU, and on a GPU it is what
ran out of memory at 8 x 2048 tokens (issue 22). SDPA takes the same [s, b, heads, d] query, key and value
(keys and values per group, as Megatron hands them over), applies the causal mask itself, and dispatches to a
flash or memory-efficient kernel on CUDA (bf16/fp16) and to its math kernel on a CPU. Same constructor and
`forward` signature as `DotProductAttention` (dot_product_attention.py:42-51, :142-151), so the spec can swap it in.
With context parallelism (`context_parallel_size` > 1) each rank holds two chunks of every row and attends to every
rank's keys and values (context.py).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

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
        """query [s, b, heads, d], key and value [s, b, groups, d] -> [s, b, heads * d] (causal)."""
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SdpaAttention is causal only: no attention mask, bias or packed sequences")
        dropout = self.dropout if self.training else 0.0
        if self.cp > 1:  # this rank's two chunks of every row (context.py)
            return cp_attention(query, key, value, cp=self.cp, rank=self.cp_rank, group=self.cp_group,
                                scale=self.scale, dropout=dropout)  # fmt: skip
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True,
                                             dropout_p=dropout)  # fmt: skip
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
