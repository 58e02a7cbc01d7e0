"""Expert parallel's token exchange: Megatron's all-gather dispatcher, made to run on a CPU (gloo) and with micro-
batches of different sizes on the ranks of an expert-parallel (EP) group. With tensor parallel (under sequence
parallel, sequence.py) the group is Megatron's TP x EP group (`tp_ep_group`): each TP rank holds its own positions
and every rank's experts are TP shards, so the exchange is needed at EP 1 too.

Megatron's `MoEAllGatherTokenDispatcher` (transformer/moe/token_dispatcher.py:208-345), per MoE layer and forward:
    token_dispatch   all-gather every EP rank's tokens, their routing map and gate weights (:256-278)
    (experts)        each rank runs its local experts on the gathered tokens routed to them (:280-308)
    token_combine    reduce-scatter the expert outputs: each rank gets its own tokens' outputs summed over the
                     ranks that hold their experts (:328-341); backward: the transposes (reduce-scatter, gather)
What it does not do, and `EpDispatcher` adds around it (its routing, permutation and expert selection stay
Megatron's):
- its gathers assume every rank has the same number of tokens (mappings.py:134-142: output = input rows x world);
  the trainer's micro-batches differ between ranks, so each rank pads its tokens to the EP group's largest count
  with rows routed to no expert (their routing map False: no expert computes them, they get zero output, and
  are cut off again after the combine);
- its gather and reduce-scatter allocate their outputs on `torch.cuda.current_device()` (mappings.py:141, :181;
  the global buffer, utils.py:631), so on a CPU the same two collectives run here through torch.distributed
  (gloo provides all_gather_single and reduce_scatter_single in torch 2.13) with the same autograd
  transposes as Megatron's `_GatherFromSequenceParallelRegion` / `_ReduceScatterToSequenceParallelRegion`.
On CUDA the padded tensors go through Megatron's own functions (super()). Packed rows change nothing here: a
micro-batch's tokens are its one row's L (its [L, 1, H] flattened), counted and padded as any others.

The all-to-all dispatcher (which sends each token only where its experts are) is not used: it makes a CUDA
stream at build (token_dispatcher.py:444-445) and syncs on it (:862-915), its `_AllToAll` allocates on CUDA
(mappings.py:442), and its `preprocess` gathers token counts through the CUDA-allocating gather (:539); gloo
does provide all_to_all_single (uneven splits too). docs/parallelism.md says what running it on a CPU takes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher


class _Gather(torch.autograd.Function):
    """All-gather along dim 0; backward: reduce-scatter (each rank's rows get the sum of every rank's gradient
    for them), as mappings.py's `_GatherFromSequenceParallelRegion` with tensor_parallel_output_grad."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """Reduce-scatter along dim 0; backward: all-gather (`_ReduceScatterToSequenceParallelRegion`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return all_gather_rows(grad, ctx.group), None


def gather(x: Tensor, group: Any) -> Tensor:
    out: Tensor = _Gather.apply(x, group)  # type: ignore[no-untyped-call]
    return out


def reduce_scatter(x: Tensor, group: Any) -> Tensor:
    out: Tensor = _ReduceScatter.apply(x, group)  # type: ignore[no-untyped-call]
    return out


def all_gather_rows(x: Tensor, group: Any) -> Tensor:
    """Every rank's `x` stacked along dim 0, in rank order (no autograd)."""
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: Tensor, group: Any) -> Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return F.pad(x, (0, 0, 0, rows - x.shape[0])) if rows > x.shape[0] else x


class EpDispatcher(MoEAllGatherTokenDispatcher):  # type: ignore[misc]
    """Megatron's all-gather dispatcher over an EP group whose ranks may hold different numbers of tokens."""

    local_tokens = 0  # this rank's tokens in the current forward (the rest of the gathered share is padding)

    def token_dispatch(self, hidden_states: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        group = self.tp_ep_group
        self.local_tokens = n = hidden_states.shape[0]
        most = torch.tensor([n], device=hidden_states.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
        rows = int(most)
        hidden_states, probs = _pad_rows(hidden_states, rows), _pad_rows(probs, rows)
        routing_map: Tensor = self.routing_map  # type: ignore[has-type]
        self.routing_map = _pad_rows(routing_map, rows)  # False: a padding row goes to no expert
        if hidden_states.is_cuda:
            out: tuple[Tensor, Tensor] = super().token_dispatch(hidden_states, probs)
            return out
        with torch.no_grad():  # gloo gathers no bool tensors
            self.routing_map = gather(self.routing_map.to(torch.uint8), group).bool()
        return gather(hidden_states, group), gather(probs, group)

    def token_combine(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.is_cuda:
            combined: Tensor = super().token_combine(hidden_states)
        else:  # in the gate weights' dtype, as Megatron's (token_dispatcher.py:338-340)
            dtype = hidden_states.dtype
            combined = reduce_scatter(hidden_states.to(self.local_probs.dtype), self.tp_ep_group).to(dtype)
        return combined[: self.local_tokens]


def use_ep_dispatcher(gpt: Any) -> None:
    """Give every MoE layer of `gpt` an `EpDispatcher` in place of the dispatcher Megatron built (MoELayer makes
    it from the config's moe_token_dispatcher_type, moe_layer.py:195-200; there is no spec slot for it)."""
    for layer in gpt.decoder.layers:
        mlp = layer.mlp
        if hasattr(mlp, "token_dispatcher"):
            mlp.token_dispatcher = EpDispatcher(mlp.num_local_experts, mlp.local_expert_indices, config=mlp.config,
                                                pg_collection=get_default_pg_collection())  # fmt: skip
