"""Megatron's process groups for the trainer's ranks, and what the backend does with them.

    world (torchrun's ranks, the trainer loop's `DataParallel`: leases, commits, publication on rank 0)
      = PP x DP x CP x TP, ranks ordered TP fastest, PP slowest (Megatron's "tp-cp-ep-dp-pp"): TP group k = ranks
      k*tp .. k*tp+tp-1; pipeline stage s = ranks s*dp*tp .. (s+1)*dp*tp-1; a PP group = one rank of each stage
      (same TP and DP rank)
    a model-parallel group (TP x PP: the ranks that together hold one whole model) trains one model split over
      its ranks; every rank of it must run the same micro-batches. The loop gives each rank its own share of the
      stream's groups (consumers/trainer.py), so the backend trains the union of its model-parallel group's
      shares (`mp_union`): every group read is trained once, by its model-parallel group, and each rank's
      leases, acknowledgements and commits stay its own (no rank reads for another). With PP, a stage other
      than the first needs only the batch's shape and the last stage its rewards and masks, but gathering the
      rows is what TP already does, costs a few kB, and keeps the loop unchanged.
    a DP group (same TP and PP rank in every model-parallel group) sums gradients (`GroupParallel`, the torch
      step's reductions); a PP group passes activations forward and their gradients back (pipeline.py).
    context parallel (CP): the cp ranks next to a TP group split every sequence (context.py); they
      train the same rows (`mp_union`) and hold the same parameters, so the step's counts and metrics are summed
      over the DP group and the gradients over DP x CP (Megatron's data-parallel group with context parallel).
    tied embeddings with PP: the first stage's embedding and the last stage's copy of it (the output layer)
      form Megatron's embedding group, whose gradients are summed (layout.py)
    expert parallel (EP, MoE only): the DP ranks are cut again for the experts (Megatron's expert rank
      order "tp-ep-dp-pp" over the same ranks, parallel_state.py:796-806, its expert TP size left at TP; with PP,
      inside each stage, as PP is outermost): at TP 1 EP group j = ranks j*ep .. j*ep+ep-1 (of the stage; with
      TP, the ranks of one TP rank in ep consecutive TP groups),
      each holding num_experts/ep of every layer's experts; the expert-data-parallel group (same EP rank in every
      EP group, dp/ep ranks) sums the experts' gradients, the DP group the rest. Each rank still trains its own
      share: an MoE layer gathers its EP group's tokens and hands back their expert outputs (dispatch.py).

Without torchrun (one process) Megatron still needs a process group: a one-rank gloo group over an in-process
store is made here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.parallel import DataParallel, sum_grads_over

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state


@dataclass(frozen=True, slots=True)
class GroupParallel(DataParallel):
    """`DataParallel` over one process group (a DP group of Megatron's): the torch train step's sums of
    counts, metrics and gradients go over it."""

    group: Any = None

    def sum(self, values: Tensor) -> Tensor:
        out = values.detach().clone()
        if self.world > 1:
            dist.all_reduce(out, group=self.group)
        return out

    def sum_grads(self, params: Any) -> None:
        if self.world > 1:
            sum_grads_over(params, self.group)

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)


@dataclass(frozen=True, slots=True)
class Groups:
    tp: int
    tp_rank: int
    tp_group: Any
    dp: GroupParallel  # this rank's data-parallel group
    ep: GroupParallel = GroupParallel()  # this rank's expert-parallel group (its ranks hold different experts)
    expert_dp: GroupParallel = GroupParallel()  # ranks holding the same experts: their gradients are summed
    pp: GroupParallel = GroupParallel()  # this rank's pipeline group: rank = stage, one rank of every stage
    embedding_group: Any = None  # first and last stage of the PP group (tied embeddings with PP > 1)
    mp_group: Any = None  # TP x PP: the ranks that hold one model together
    cp: GroupParallel = GroupParallel()  # this rank's context-parallel group: each holds part of every sequence
    dp_cp: GroupParallel | None = None  # DP x CP: the ranks whose gradients are summed (None: the DP group)
    pp_back: Any = None  # the PP group's ranks again, for the gradients sent back (pipeline.py says why)

    @property
    def grads(self) -> GroupParallel:
        """The group the replicated parameters' gradients are summed over."""
        return self.dp_cp if self.dp_cp is not None else self.dp

    @property
    def first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp.rank == self.pp.world - 1

    @property
    def tp_parallel(self) -> GroupParallel:
        """Sums over this rank's tensor-parallel group."""
        return GroupParallel(rank=self.tp_rank, world=self.tp, group=self.tp_group)


def init_groups(world: DataParallel, tensor_parallel: int, expert_parallel: int = 1, pipeline_parallel: int = 1,
                context_parallel: int = 1) -> Groups:  # fmt: skip
    """Megatron's groups over the trainer's ranks (made once a process; a second call with the same sizes reuses
    them, with other sizes remakes them)."""
    if world.world % (tensor_parallel * pipeline_parallel * context_parallel):
        raise ValueError(f"trainer.megatron.tensor_parallel={tensor_parallel} x pipeline_parallel="
                         f"{pipeline_parallel} x context_parallel={context_parallel} must divide the "
                         f"{world.world} ranks")  # fmt: skip
    dp_size = world.world // (tensor_parallel * pipeline_parallel * context_parallel)
    if (dp_size * context_parallel) % expert_parallel:  # Megatron's expert groups fold the CP ranks in
        what = (
            f"{dp_size} data-parallel"
            if context_parallel == 1
            else f"{dp_size} data-parallel x {context_parallel} context-parallel"
        )
        raise ValueError(f"trainer.megatron.expert_parallel={expert_parallel} must divide the {what} ranks")
    if not dist.is_initialized():
        if world.world > 1:
            raise RuntimeError("the megatron backend over several ranks needs torch.distributed up (torchrun)")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_expert_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_context_parallel_world_size())  # fmt: skip
        if sizes != (tensor_parallel, expert_parallel, pipeline_parallel, context_parallel):
            parallel_state.destroy_model_parallel()
            _BACK.clear()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 pipeline_model_parallel_size=pipeline_parallel,
                                                 expert_model_parallel_size=expert_parallel,
                                                 context_parallel_size=context_parallel)  # fmt: skip
    dp = GroupParallel(rank=parallel_state.get_data_parallel_rank(),
                       world=parallel_state.get_data_parallel_world_size(),
                       group=parallel_state.get_data_parallel_group())  # fmt: skip
    ep = GroupParallel(rank=parallel_state.get_expert_model_parallel_rank(), world=expert_parallel,
                       group=parallel_state.get_expert_model_parallel_group())  # fmt: skip
    expert_dp = GroupParallel(rank=parallel_state.get_expert_data_parallel_rank(),
                              world=parallel_state.get_expert_data_parallel_world_size(),
                              group=parallel_state.get_expert_data_parallel_group())  # fmt: skip
    pp = GroupParallel(rank=parallel_state.get_pipeline_model_parallel_rank(), world=pipeline_parallel,
                       group=parallel_state.get_pipeline_model_parallel_group())  # fmt: skip
    cp = GroupParallel(rank=parallel_state.get_context_parallel_rank(), world=context_parallel,
                       group=parallel_state.get_context_parallel_group())  # fmt: skip
    dp_cp = None if context_parallel == 1 else GroupParallel(
        rank=parallel_state.get_data_parallel_rank(with_context_parallel=True), world=dp_size * context_parallel,
        group=parallel_state.get_data_parallel_group(with_context_parallel=True))  # fmt: skip
    # a middle stage is in no embedding group (Megatron's getter asserts there)
    embedding = parallel_state.get_embedding_group() if parallel_state.is_rank_in_embedding_group() else None
    return Groups(tp=tensor_parallel, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                  tp_group=parallel_state.get_tensor_model_parallel_group(), dp=dp, ep=ep,
                  expert_dp=expert_dp, pp=pp, embedding_group=embedding,
                  mp_group=parallel_state.get_model_parallel_group(), cp=cp, dp_cp=dp_cp,
                  pp_back=_back_group(pp) if pipeline_parallel > 1 else None)  # fmt: skip


_BACK: dict[tuple[int, ...], Any] = {}  # {a PP group's global ranks: its second group}, while Megatron's stand


def _back_group(pp: GroupParallel) -> Any:
    """A second process group over this rank's PP group's ranks. Every rank makes every PP group's (new_group is
    collective over the world), in the same order, once per `init_groups` of these sizes."""
    mine = tuple(dist.get_process_group_ranks(pp.group))
    if mine not in _BACK:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        for ranks in sorted(set(every)):
            _BACK[ranks] = dist.new_group(list(ranks))
    return _BACK[mine]


def release_groups() -> None:
    """Undo `init_groups` (tests: one process builds several backends); the default group too if it is the
    one-rank group made here."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _BACK.clear()
    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


def mp_union(batch: RolloutBatch, groups: Groups) -> RolloutBatch:
    """Every rank of this model-parallel group's batch (TP x PP ranks, then the CP ranks' unions of theirs), one
    after the other (rank order): what the group trains."""
    size = groups.tp * groups.pp.world
    if size > 1:
        parts: list[Any] = [None] * size
        dist.all_gather_object(parts, batch, group=groups.mp_group)
        batch = concat(parts)
    if groups.cp.world > 1:  # each CP rank holds its TP x PP group's union: every rank of TP x CP x PP the same
        batch = concat(groups.cp.gather(batch))
    return batch


def concat(parts: list[RolloutBatch]) -> RolloutBatch:
    """Batches one after the other; group indices stay distinct (each part's shifted past the previous)."""
    t = max(p.mask_BT.shape[1] for p in parts)

    def pad(x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]))

    offsets = np.cumsum([0] + [int(p.group_B.max()) + 1 if p.size else 0 for p in parts[:-1]])
    routed = any(p.routing for p in parts)
    return RolloutBatch(
        prompts=[x for p in parts for x in p.prompts],
        responses=[x for p in parts for x in p.responses],
        logp_rollout_BT=torch.cat([pad(p.logp_rollout_BT) for p in parts]),
        mask_BT=torch.cat([pad(p.mask_BT) for p in parts]),
        rewards_B=torch.cat([p.rewards_B for p in parts]),
        group_B=torch.cat([p.group_B + int(o) for p, o in zip(parts, offsets, strict=True)]),
        routing=[r for p in parts for r in (p.routing or [None] * p.size)] if routed else [],
    )
