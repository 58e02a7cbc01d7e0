"""Sequence parallelism (SP, trainer.megatron.sequence_parallel): with tensor parallel, the parts of a layer that
are not split over the TP ranks (the norms, the residual stream, the MoE router) each hold 1/tp of the sequence,
as Megatron lays them out when `TransformerConfig.sequence_parallel` is set (Korthikanti et al. 2022).

    embedding      [L, b, H] (every rank's vocabulary share all-reduced, as without SP) -> this rank's chunk of
                   L/tp positions (`scatter_sequence`; backward: the chunks' gradients all-gathered). Megatron
                   reduce-scatters inside the embedding instead (tensor_parallel/layers.py:293-297): the same
                   result for one all-reduce in place of one reduce-scatter, once a forward
    norm           each rank normalises its own positions: the weight's gradient is that chunk's, summed over the
                   TP group before the step (`sequence_parallel` on the weight; layout.py, as Megatron's
                   finalize_model_grads.py:353-356)
    column linear  (qkv, dense fc1) the input all-gathered over the TP group first; backward reduce-scattered
                   (tensor_parallel/layers.py:478-484, :548-556)
    row linear     (attention's output projection, dense fc2) the partial sums reduce-scattered over the TP group
                   in place of all-reduced (:1288-1291); backward all-gathered
    attention      between the two: every position, its heads' share, as without SP
    MoE            the router and the all-gather dispatcher see this rank's positions; the dispatcher gathers the
                   TP x EP group's tokens for the experts, each split over the TP ranks as the dense MLP is
                   (Megatron's expert_tensor_parallel_size = TP, its default), and reduce-scatters their outputs
                   (dispatch.py)
    output layer   the last stage's hidden states all-gathered (`gather_sequence`; backward: reduce-scattered,
                   which sums every rank's vocabulary share of the gradient, in place of the all-reduce without
                   SP, logprobs.py)

Every forward's rows are right-padded to a multiple of tp (`SequenceSplit`); packed rows get one extra sequence of
padding (model.py). Megatron's own linear layers under SP allocate their gather buffers on
`torch.cuda.current_device()` (layers.py:482 -> utils.py global buffer; mappings.py:141, :181): on CUDA they run
as they are; on a CPU `SpColumnParallelLinear` / `SpRowParallelLinear` move the same collectives through
torch.distributed (gloo), around the same matmul.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from miles_stream.trainer.megatron.dispatch import all_gather_rows, gather, reduce_scatter
from miles_stream.trainer.torch.inputs import MicroInputs

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True, slots=True)
class SequenceSplit:
    """One TP rank's share of a sequence of `length` positions under SP: the positions padded to a multiple of tp,
    then cut into tp consecutive chunks (Megatron's `_split_along_first_dim`, mappings.py:55-77); rank r holds
    chunk r. Same interface as context.ContextSplit where R3 cuts its recording (moe.py `localize`)."""

    tp: int
    rank: int
    length: int

    @property
    def chunk(self) -> int:
        return -(-self.length // self.tp)

    @property
    def padded(self) -> int:
        return self.chunk * self.tp

    def positions(self, device: torch.device | str) -> Tensor:
        """[chunk] the positions this rank holds."""
        return torch.arange(self.rank * self.chunk, (self.rank + 1) * self.chunk, device=device)


class _Scatter(torch.autograd.Function):
    """Forward: this rank's chunk of dim 0. Backward: every rank's chunk gradient all-gathered (Megatron's
    `_ScatterToSequenceParallelRegion`, mappings.py)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(world, dim=0)[rank].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return all_gather_rows(grad, ctx.group), None


def scatter_sequence(x_LbH: Tensor, group: Any) -> Tensor:
    """[L/tp, b, H] this rank's chunk of the positions (L a multiple of tp)."""
    out: Tensor = _Scatter.apply(x_LbH, group)  # type: ignore[no-untyped-call]
    return out


def gather_sequence(x_lbH: Tensor, group: Any) -> Tensor:
    """[L, b, H] every TP rank's chunk in rank order; backward: the sum of every rank's gradient of this rank's
    chunk (a reduce-scatter: each rank's part of the model contributed to every position)."""
    return gather(x_lbH, group)


class SequenceParallelNorm(nn.RMSNorm):
    """The layer spec's RMSNorm (in place of Megatron's WrappedTorchNorm, transformer/torch_norm.py, which asserts
    SP off at :32): torch's RMSNorm with its weight made in the parameters' dtype (WrappedTorchNorm makes it float32
    beside bf16 parameters, so every norm's output came out float32 and was saved at twice the bytes) and marked
    `sequence_parallel` under SP, as Megatron's fused (Apex) norm marks its own (fusions/fused_layer_norm.py:
    116-120), so its gradient is summed over the TP group (layout.py)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


class SpColumnParallelLinear(ColumnParallelLinear):  # type: ignore[misc]
    """Megatron's ColumnParallelLinear; under SP on a CPU its input gather goes through torch.distributed."""

    def forward(self, input_: Tensor, weight: Tensor | None = None, runtime_gather_output: bool | None = None) -> Any:
        if not self.sequence_parallel or input_.is_cuda:
            return super().forward(input_, weight, runtime_gather_output)
        if self.gather_output or runtime_gather_output:
            raise ValueError("SpColumnParallelLinear keeps its output split (the layer spec's qkv and fc1 do)")
        # the gathered input through a plain column-parallel matmul: no all-reduce of the input's gradient (the
        # gather's backward reduce-scatters it)
        out = self._forward_impl(input=gather_sequence(input_, self.tp_group),
                                 weight=self.weight if weight is None else weight,
                                 bias=None if self.skip_bias_add else self.bias,
                                 gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                 allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None,
                                 wgrad_deferral_limit=None, tp_group=self.tp_group)  # fmt: skip
        return out, self.bias if self.skip_bias_add else None


class SpRowParallelLinear(RowParallelLinear):  # type: ignore[misc]
    """Megatron's RowParallelLinear; under SP on a CPU its output reduce-scatter goes through torch.distributed."""

    def forward(self, input_: Tensor) -> Any:
        if not self.sequence_parallel or input_.is_cuda:
            return super().forward(input_)
        out = self._forward_impl(input=input_, weight=self.weight, bias=None,
                                 gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                 allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                                 grad_output_buffer=None)  # fmt: skip
        return reduce_scatter(out, self.tp_group), None


def pad_rows(x: MicroInputs, tp: int, pad: int) -> MicroInputs:
    """The micro-batch's rows right-padded to a multiple of tp positions with `pad` (causal attention: nothing
    before the padding sees it, and no response token is read from it). Packed rows get the padding as one more
    sequence (its own cu_seqlens entry: it attends to itself only, and its positions restart at 0)."""
    length = x.input_ids.shape[1]
    extra = SequenceSplit(tp, 0, length).padded - length
    if extra == 0:
        return x
    ids = F.pad(x.input_ids, (0, extra), value=pad)
    if x.cu_seqlens is None:
        return replace(x, input_ids=ids)
    tail = torch.arange(extra, device=ids.device, dtype=x.position_ids.dtype if x.position_ids is not None else None)
    return replace(x, input_ids=ids,
                   position_ids=None if x.position_ids is None else torch.cat([x.position_ids, tail[None]], dim=1),
                   cu_seqlens=torch.cat([x.cu_seqlens, x.cu_seqlens.new_tensor([length + extra])]),
                   max_length=max(x.max_length, extra))  # fmt: skip
