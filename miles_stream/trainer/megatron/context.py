"""Context parallelism (CP): each sequence of a micro-batch split over the ranks of a CP group, so a rank holds
1/cp of every row's activations (long reasoning traces: a 32k-token row's activations on cp ranks).

    split       the micro-batch's [b, L] rows right-padded to a multiple of 2*cp and cut into 2*cp chunks of c
                tokens; CP rank r holds chunks r and 2*cp-1-r ([b, 2c]): under causal attention the first chunks
                are cheap and the last dear, so each rank gets one of each, as Megatron splits them
                (models/common/embeddings/rope_utils.py:62-69, `get_pos_emb_on_this_cp_rank`)
    RoPE        each token at its global position (model.py builds the table for the padded length and picks
                this rank's positions)
    attention   each rank's keys and values all-gathered over the CP group (Megatron's cp_comm_type "all_gather";
                the gather's backward sums each rank's key/value gradients back to it); each local query chunk j
                attends keys 0 .. (j+1)c-1, causal aligned to the lower right (`causal_lower_right`: query i of
                the chunk sees keys up to j*c + i). Keys and values are held whole for one layer at a time
                (2 x L x groups x d a row, repeated to the query heads for the kernels); the ring exchange that
                avoids even that is not built
    logprobs    each rank computes the response tokens whose predicting position it holds; the [b, T] results are
                summed over the CP group by `sum_over_cp`, whose backward passes the gradient through unchanged:
                every CP rank computes the same loss on the same logprobs and keeps only its own tokens' paths,
                and the gradients are summed over DP x CP (layout.py), so each path is counted once
    batches     a CP group's ranks train the same rows (parallel.mp_union), as a TP group's do

The pad tokens past a row's end attend only to what is before them and nothing reads their outputs, so the split
changes no logprob."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


@dataclass(frozen=True, slots=True)
class ContextSplit:
    """One CP rank's share of a sequence of `length` tokens."""

    cp: int
    rank: int
    length: int

    @property
    def chunk(self) -> int:
        """c: tokens a chunk (the padded length / 2cp)."""
        return -(-self.length // (2 * self.cp))

    @property
    def padded(self) -> int:
        return self.chunk * 2 * self.cp

    @property
    def chunks(self) -> tuple[int, int]:
        """The global indices of this rank's two chunks."""
        return self.rank, 2 * self.cp - 1 - self.rank

    def positions(self, device: torch.device | str) -> Tensor:
        """[2c] the global positions of this rank's tokens (its first chunk's, then its second's)."""
        c = self.chunk
        return torch.cat([torch.arange(j * c, (j + 1) * c, device=device) for j in self.chunks])

    def local_index(self, device: torch.device | str) -> Tensor:
        """[padded] where each global position sits among this rank's tokens, -1 where it is another rank's."""
        where = torch.full((self.padded,), -1, dtype=torch.long, device=device)
        where[self.positions(device)] = torch.arange(2 * self.chunk, device=device)
        return where

    def take(self, ids_bL: Tensor, pad: int) -> Tensor:
        """[b, 2c] this rank's tokens of right-padded rows [b, L]."""
        padded = F.pad(ids_bL, (0, self.padded - ids_bL.shape[1]), value=pad)
        return padded[:, self.positions(ids_bL.device)]


def cp_attention(q: Tensor, k: Tensor, v: Tensor, *, cp: int, rank: int, group: Any, scale: float,
                 dropout: float) -> Tensor:  # fmt: skip
    """This rank's attention output [2c, b, heads * d] from its queries q [2c, b, heads, d] and keys / values
    [2c, b, groups, d] (its two chunks each), every rank's keys and values gathered."""
    c = q.shape[0] // 2
    gathered = gather_kv(torch.stack([k, v]), group).unbind(0)  # cp x [2, 2c, b, g, d], rank order
    pieces: list[Tensor] = [torch.empty(0)] * (2 * cp)  # every rank's [2, 2c, b, g, d], in global chunk order
    for r, kv in enumerate(gathered):  # back to global chunk order
        pieces[r], pieces[2 * cp - 1 - r] = kv[:, :c], kv[:, c:]
    keys, values = torch.cat(pieces, dim=1).unbind(0)  # [2cp * c, b, g, d]
    if (heads := q.shape[2] // keys.shape[2]) > 1:
        # each group's key and value for each of its query heads: the lower-right mask's CUDA paths call the flash
        # and memory-efficient kernels directly, without SDPA's GQA handling (torch/nn/attention/bias.py
        # `CausalBias._dispatch`); the repeat is this layer's gathered keys and values x heads / groups, freed after
        keys, values = keys.repeat_interleave(heads, dim=2), values.repeat_interleave(heads, dim=2)
    out = []
    for half, j in enumerate((rank, 2 * cp - 1 - rank)):
        seen = (j + 1) * c
        qj, kj, vj = (t.permute(1, 2, 0, 3) for t in (q[half * c : (half + 1) * c], keys[:seen], values[:seen]))
        o = F.scaled_dot_product_attention(qj, kj, vj, attn_mask=causal_lower_right(c, seen), scale=scale,
                                           dropout_p=dropout)  # fmt: skip
        out.append(o.permute(2, 0, 1, 3))  # [c, b, heads, d]
    whole = torch.cat(out)
    return whole.reshape(whole.shape[0], whole.shape[1], -1)


class _GatherKv(torch.autograd.Function):
    """Forward: every CP rank's tensor, stacked in rank order. Backward: the sum of every rank's gradient of this
    rank's part (a reduce-scatter; on gloo, which has none, an all-reduce then this rank's slice). Not
    torch.distributed.nn's all_gather: its gloo backward scatters from group ranks as if they were global ranks
    (functional.py `_AlltoAll`), which fails for any CP group but the one holding rank 0."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group=group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        summed = grad.clone()  # autograd's gradient is not ours to write into
        dist.all_reduce(summed, group=ctx.group)
        return summed[ctx.rank], None


def gather_kv(x: Tensor, group: Any) -> Tensor:
    """[cp, ...] every CP rank's `x` (rank order), differentiable (see `_GatherKv`)."""
    out: Tensor = _GatherKv.apply(x, group)  # type: ignore[no-untyped-call]
    return out


class _SumOverCp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def sum_over_cp(x: Tensor, group: Any) -> Tensor:
    """The sum of every CP rank's `x` (each holds its own tokens' values, zeros elsewhere); its gradient passes
    through to this rank's `x` unchanged (see the module's docstring)."""
    out: Tensor = _SumOverCp.apply(x, group)  # type: ignore[no-untyped-call]
    return out
