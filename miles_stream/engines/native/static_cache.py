"""A preallocated KV cache and the decoder's forward pass over it, for the native engine on dense models.

    StaticDecoder(model, slots, max_len)
        k, v caches   [L, slots, H_kv, max_len, D]       one row of the batch per slot, kept compact:
                                                         the engine's rows 0..B-1 sit in slots 0..B-1
        prefill(ids [n, T] right-padded, lengths, first_slot) -> logits [n, V] at each row's last prompt token
        decode(ids, positions) -> logits [n, V]                   one token per row, written at its position
        move(src, dst)                                            a row's cache to another slot (compaction)

The forward pass reuses the Hugging Face model's own modules (embedding, norms, projections, rotary
embedding, MLP, output layer), so the arithmetic is theirs; only attention over the cache is written here:
each row attends to its positions <= its own, the query heads grouped onto their KV head (no copy of K/V per
query head), through `kernels.decode_attention` (Triton on CUDA, reading each row's cache up to its length).
On CUDA each decode step for a bucket of rows is captured in a CUDA graph when the decoder is built (every
bucket, before it serves: see __init__) and replayed: a step is one launch instead of hundreds; with
`compile` the parts of each layer before and after attention are compiled by torch.compile, fusing the
elementwise work between the matmuls (a thousand small kernels a step for a 28-layer model otherwise); if
the compiler fails, the eager step is used and a warning logged.
Weight updates copy into the same parameters, so the graphs stay valid. Families: Llama, Qwen2, Qwen3,
Mistral (dense); MoE models take the engine's dynamic path.

Shapes: L layers, H_kv key/value heads, G query heads per KV head, D head dim, V vocabulary.
"""

from __future__ import annotations

import sys
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from torch import Tensor

from miles_stream.kernels.decode_attention import decode_attention

log = structlog.get_logger(__name__)
FAMILIES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"})


def supports(model: Any) -> bool:
    """True for the dense families above without a sliding window."""
    config = model.config
    return type(model).__name__ in FAMILIES and not getattr(config, "sliding_window", None)


def _buckets(limit: int, first: int) -> list[int]:
    out = [first]
    while out[-1] < limit:
        out.append(min(out[-1] * 2, limit))
    return out


class StaticDecoder:
    def __init__(self, model: Any, *, slots: int, max_len: int, graphs: bool, compile: bool = False) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a dense Llama/Qwen2/Qwen3/Mistral model")
        base = model.model
        self.embed, self.layers, self.norm = base.embed_tokens, list(base.layers), base.norm
        self.rotary, self.head = base.rotary_emb, model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = int(attn.head_dim), float(attn.scaling)
        self.q_heads = int(model.config.num_attention_heads)
        self.kv_heads = int(model.config.num_key_value_heads)
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        weight = self.head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.slots, self.max_len = slots, max_len
        shape = (len(self.layers), slots, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._ids = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._rows = torch.arange(slots, device=self.device)
        self.use_graphs = graphs and self.device.type == "cuda"
        # Fusing the small kernels around attention (norms, rotary, residuals, SiLU): the parts of a layer before
        # and after attention are compiled, once for every layer and row count. The cache writes and attention
        # stay outside: compiled, a write into the cache became a copy of the whole cache.
        self._compiled = compile and self.use_graphs
        self._before = torch.compile(self._before_attention, dynamic=True) if self._compiled else self._before_attention
        self._after = torch.compile(self._after_attention, dynamic=True) if self._compiled else self._after_attention
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool: Any = None
        self._row_buckets = _buckets(slots, 1)
        self._len_buckets = _buckets(max_len, min(256, max_len))
        # Every graph now, before the engine serves: CUDA invalidates a capture when another thread uses the
        # device meanwhile (a copy from pageable memory, a synchronize: the engine's weight staging, a weight
        # transport's reader), and a capture on first use of a row bucket could meet a weight update.
        for rows in self._row_buckets if self.use_graphs else []:
            self._graphs[(rows, max_len)] = self._capture(rows, max_len)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # ---- prefill ----------------------------------------------------------------------------------------
    def prefill(self, ids: Tensor, lengths: list[int], first_slot: int) -> Tensor:
        n, width = ids.shape
        positions = torch.arange(width, device=self.device).expand(n, width)
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions)
        slots = slice(first_slot, first_slot + n)
        for i, layer in enumerate(self.layers):
            residual, h = x, layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, cos, sin)
            self.k[i, slots, :, :width] = k
            self.v[i, slots, :, :width] = v
            # right padding: a real query never sees a padded key under the causal mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            x = residual + layer.self_attn.o_proj(out.transpose(1, 2).reshape(n, width, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = x[torch.arange(n, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        logits: Tensor = self.head(self.norm(last)).float()
        return logits

    # ---- decode -------------------------------------------------------------------------------------------
    def decode(self, ids: list[int], positions: list[int]) -> Tensor:
        """Feed token ids[j] at position positions[j] of slot j; the logits of the next token of each."""
        n = len(ids)
        rows = next(b for b in self._row_buckets if b >= n)
        # the Triton kernel reads each row only up to its length: one graph per row bucket covers every length
        span = self.max_len if self.use_graphs else next(s for s in self._len_buckets if s > max(positions))
        self._ids[:n, 0] = torch.tensor(ids, device=self.device)
        self._pos[:n, 0] = torch.tensor(positions, device=self.device)
        if rows > n:  # padding rows write at position 0 of slots no row holds (or that the next prefill rewrites)
            self._ids[n:rows] = 0
            self._pos[n:rows] = 0
        if not self.use_graphs:
            return self._step(rows, span)[:n]
        graph, out = self._graphs[(rows, span)]  # every bucket was captured in __init__
        graph.replay()
        return out[:n]

    def move(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def _capture(self, rows: int, span: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            try:
                for _ in range(2):  # warm-up outside the graph: compiled, kernels chosen, workspaces allocated
                    self._step(rows, span)
            except Exception as exc:  # any compiler failure: the eager step computes the same
                if not self._compiled:
                    raise
                log.warning("decode_compile_failed", error=repr(exc)[:500])
                self._compiled = False
                self._before, self._after = self._before_attention, self._after_attention
                for _ in range(2):
                    self._step(rows, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(rows, span)
        self._pool = graph.pool()
        return graph, out

    def _step(self, rows: int, span: int) -> Tensor:
        """One token for slots 0..rows-1 from the static input buffers; attends to the first `span` positions."""
        ids, pos = self._ids[:rows], self._pos[:rows]
        x = self.embed(ids)
        cos, sin = self.rotary(x, pos)
        lengths = pos[:, 0] + 1  # positions each row attends to, its new one included
        slots = self._rows[:rows]
        group = self.q_heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = self._before(layer, x, cos, sin)
            self.k[i, slots, :, pos[:, 0]] = k[:, :, 0]
            self.v[i, slots, :, pos[:, 0]] = v[:, :, 0]
            q = q.reshape(rows, self.kv_heads, group, self.head_dim)  # query heads of one KV head side by side
            out = decode_attention(q, self.k[i, :rows, :, :span], self.v[i, :rows, :, :span], lengths, self.scaling)
            x = self._after(layer, x, out.reshape(rows, 1, -1))
        logits: Tensor = self.head(self.norm(x[:, 0])).float()
        return logits

    def _before_attention(self, layer: Any, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._qkv(layer.self_attn, layer.input_layernorm(x), cos, sin)

    def _after_attention(self, layer: Any, residual: Tensor, attended: Tensor) -> Tensor:
        x = residual + layer.self_attn.o_proj(attended)
        out: Tensor = x + layer.mlp(layer.post_attention_layernorm(x))
        return out

    def _qkv(self, attn: Any, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections, the per-head norms where the family has them (Qwen3), rotary: [n, heads, T, D] each."""
        n, width = h.shape[:2]
        q = attn.q_proj(h).view(n, width, -1, self.head_dim)
        k = attn.k_proj(h).view(n, width, -1, self.head_dim)
        v = attn.v_proj(h).view(n, width, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v
