"""`MegatronLayout`: the torch train step's `ModelLayout` (trainer/torch/layout.py) for a GPTModel split over a
tensor-parallel group, its MoE experts split over an expert-parallel (EP) group, replicated over the rest.

    pipeline       (PP > 1) each stage holds its own layers (Megatron's pre_process / post_process stages; MoE:
                   their routers and experts, the experts split over the stage's EP group, whose expert-DP group
                   is inside the stage too: the sums below are per stage, then the clip norm's over PP): a
                   tied model's last stage holds a copy of the embedding as its output layer, whose gradient is
                   summed with the embedding's over the embedding group (first and last stage), as Megatron's
                   finalize_model_grads does (distributed/finalize_model_grads.py:164), so the two copies stay equal
    reduce_grads   experts (the parameters Megatron marks `allreduce=False` under EP, tensor_parallel/layers.py:886,
                   experts.py:203-204; its DDP sorts them by that mark, distributed_data_parallel.py:122): summed
                   over the expert-data-parallel group; the rest over the DP group (one flat all-reduce each; the
                   TP ranks of a group saw the same batch, and Megatron's layers already all-reduce what a TP split
                   needs inside their backward); the q/k norms' gradients summed over the TP group first: each rank
                   normalises only its own heads with the shared [d] weight, and under sequence parallel the
                   norms' and routers' too: each rank saw only its own positions (Megatron does the same in
                   finalize_model_grads.py:353-356); experts are split over TP as the dense MLP is (sequence.py)
    clip_grads     global 2-norm: squares of TP-split parameters summed over the TP group, replicated ones (the
                   norms, the routers) counted once (on TP rank 0), experts' squares summed over the EP group
                   (each rank holds other experts), every stage's summed over the PP group (a tied model's copy of
                   the embedding counted once, on the first stage, as Megatron skips `shared` ones,
                   clip_grads.py:221); then torch's clip rule (max_norm / (norm + 1e-6), at most 1)
    align          with EP every forward is a collective of the EP group (dispatch.py): every DP rank runs as
                   many micro-batches, the short ones padded with repeats that add nothing (as FSDP's, fsdp.py)
    weights        each parameter's TP shards gathered in turn (an expert's once each TP rank has its shard from
                   the EP rank that holds the expert inside its stage), each layer's shards broadcast over the PP
                   group from the stage that holds it (convert.home says which), and converted to HF names
                   (convert.iter_hf), in the publish dtype; streamed (`StreamedWeights`): gathered as the
                   publisher reads it, one HF tensor (an MoE layer's experts) at a time on every rank
    save / load    rank 0 of each (TP, PP, EP) rank's replicas (the stage's DP group, or DP x CP; with EP its
                   expert-DP group) writes megatron-tp{k}[-pp{s}][-ep{j}].safetensors (its shards and experts, its
                   stage's Megatron names) and megatron-tp{k}[-pp{s}][-ep{j}].pt (AdamW, its parameters' names in
                   the optimizer's order, schedule, torch RNG), rank 0 megatron.json (the sizes); every rank reads
                   its (TP, PP, EP) rank's pair (-pp{s} only with PP > 1, -ep{j} only with EP > 1: the files of PP 1
                   and EP 1 are unchanged). A checkpoint saved at other sizes: each rank rebuilds its shards and
                   AdamW's from the files it needs (reshard.py)
    export_hf      the gathered HF tensors streamed into rank 0's safetensors shards (trainer/torch/hf.py
                   `export_streamed`: on-disk names, one shard in host memory at a time), with the source
                   checkpoint's config and tokenizer
"""

from __future__ import annotations

import math
from collections.abc import Callable, ItemsView, Iterator, Mapping, Sequence, ValuesView
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron import reshard
from miles_stream.trainer.megatron.convert import home, iter_hf
from miles_stream.trainer.megatron.model import MegatronPolicy
from miles_stream.trainer.megatron.parallel import GroupParallel, Groups
from miles_stream.trainer.megatron.pipeline import OneFOneB
from miles_stream.trainer.megatron.zero import ShardedAdamW
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import export_streamed
from miles_stream.trainer.torch.optim import adamw_options, build_optimizer


class StreamedWeights(Mapping[str, Tensor]):
    """HF-named tensors made one at a time by `produce()`, a generator of collectives (every rank reads the same
    tensors in the same order). `items()` and `values()` stream: a tensor is gathered when the reader reaches it
    and freed when the reader lets go of it, so no rank holds the whole model twice (the publisher's snapshot on
    rank 0 holds one copy, in the publish dtype, as with every backend); that is how a publication reads it
    (weights/background.py `_copy_into`, service.py `_offer`). Any other use (a name, `len`, `dict(...)`) gathers
    the whole model once into a dict, on every rank."""

    def __init__(self, produce: Callable[[], Iterator[tuple[str, Tensor]]]) -> None:
        self._produce = produce
        self._whole: dict[str, Tensor] | None = None

    def _all(self) -> dict[str, Tensor]:
        if self._whole is None:
            self._whole = dict(self._produce())
        return self._whole

    def items(self) -> ItemsView[str, Tensor]:
        return _StreamedItems(self)

    def values(self) -> ValuesView[Tensor]:
        return _StreamedValues(self)

    def __getitem__(self, name: str) -> Tensor:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class _StreamedItems(ItemsView[str, Tensor]):
    _mapping: StreamedWeights

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        return self._mapping._produce()

    def __len__(self) -> int:  # not the mapping's (a whole gather): `list(items())` then streams once
        raise TypeError("a streamed publication has no length before it is read")


class _StreamedValues(ValuesView[Tensor]):
    _mapping: StreamedWeights

    def __iter__(self) -> Iterator[Tensor]:
        return (tensor for _, tensor in self._mapping._produce())

    def __len__(self) -> int:
        raise TypeError("a streamed publication has no length before it is read")


class MegatronLayout:
    casts_compute = False

    def __init__(self, groups: Groups, world: DataParallel, model: MegatronPolicy,
                 publish_dtype: torch.dtype | None = None, distributed_optimizer: bool = False) -> None:  # fmt: skip
        self.groups = groups
        self.distributed_optimizer = distributed_optimizer  # AdamW's state split over each part's replicas (zero.py)
        self.publish_dtype = publish_dtype  # the dtype published tensors are gathered in (None: the parameters')
        self.parallel: DataParallel = groups.dp
        self.world = world
        named = list(model.gpt.named_parameters())
        # whole on every TP rank with a gradient of the rank's own share: the q/k norms (each rank normalises its
        # own heads), and under sequence parallel every parameter Megatron marks `sequence_parallel` (the norms,
        # the MoE routers: each rank saw its own positions; router.py:74, sequence.py)
        self.tp_partial = [p for n, p in named if "q_layernorm" in n or "k_layernorm" in n
                           or getattr(p, "sequence_parallel", False)]  # fmt: skip
        # whole on every TP rank: the norms and the MoE routers. By name: Megatron marks split parameters
        # (`tensor_model_parallel`) only when it initialises them (tensor_parallel/layers.py:244-266, :855-886),
        # which the backend skips
        self.replicated = {id(p) for n, p in named if n.endswith(("layernorm.weight", "mlp.router.weight"))}
        self.experts = {id(p) for _, p in named if not getattr(p, "allreduce", True)}  # split over EP (see above)
        self.aligns_frozen = groups.ep.world > 1  # a frozen reference's experts are split too
        pp = groups.pp
        # PP: a step's micro-batches in 1F1B order (pipeline.py)
        self.pipeline = (
            OneFOneB(model, pp.rank, pp.world, pp.group, dist.get_global_rank(pp.group, pp.world - 1))
            if pp.world > 1 else None
        )  # fmt: skip
        self.split = model.split  # the pipeline stages' layer counts (recorded in megatron.json: reshard.py)
        self.tied_copy: nn.Parameter | None = None  # this stage's copy of a tied embedding (PP > 1)
        if pp.world > 1 and model.shape.tied and (groups.first_stage or groups.last_stage):
            gpt = model.gpt
            self.tied_copy = gpt.embedding.word_embeddings.weight if groups.first_stage else gpt.output_layer.weight
        # counted in the gradient norm on the first stage only
        self.uncounted = {id(self.tied_copy)} if self.tied_copy is not None and not groups.first_stage else set()
        # what every stage holds ({local name: (shape, dtype)}, stage order): a publication's receive buffers
        self.stage_meta: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = (
            pp.gather({n: (tuple(p.shape), p.dtype) for n, p in named}) if pp.world > 1 else []
        )

    def _split(self, params: Sequence[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the replicated parameters, the experts split over the EP group)"""
        return [p for p in params if id(p) not in self.experts], [p for p in params if id(p) in self.experts]

    @property
    def replicas(self) -> GroupParallel:
        """The ranks holding this rank's checkpoint files (experts and all: with EP the expert-DP group)."""
        return self.groups.grads if self.groups.ep.world == 1 else self.groups.expert_dp

    def optimizer(self, params: Sequence[nn.Parameter], config: TrainerConfig) -> torch.optim.Optimizer:
        if not self.distributed_optimizer:
            return build_optimizer(params, config)
        trained = [p for p in params if p.requires_grad]
        dense, experts = self._split(trained)  # the gradient sums' two groups (reduce_grads)
        options = adamw_options(trained, config)
        return ShardedAdamW([(dense, self.groups.grads), (experts, self.groups.expert_dp)], options)

    def reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        if self.groups.tp > 1:
            self.groups.tp_parallel.sum_grads([p for p in self.tp_partial if p.requires_grad])
        dense, experts = self._split(params)
        self.groups.grads.sum_grads(dense)  # DP, or DP x CP with context parallel
        self.groups.expert_dp.sum_grads(experts)
        copy = self.tied_copy
        if copy is not None and copy.requires_grad:
            if copy.grad is None:
                copy.grad = torch.zeros_like(copy)
            dist.all_reduce(copy.grad, group=self.groups.embedding_group)

    def clip_grads(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        first = self.groups.tp_rank == 0
        dense, experts = self._split(params)

        def squares(of: Sequence[nn.Parameter]) -> Tensor:
            parts = [p.grad.float().pow(2).sum() for p in of if p.grad is not None and id(p) not in self.uncounted
                     and (first or id(p) not in self.replicated)]  # fmt: skip
            return torch.stack(parts).sum() if parts else torch.zeros((), device=grads[0].device)

        total, expert_total = squares(dense), squares(experts)
        if self.groups.ep.world > 1:
            dist.all_reduce(expert_total, group=self.groups.ep.group)
        total = total + expert_total
        if self.groups.tp > 1:
            dist.all_reduce(total, group=self.groups.tp_group)
        if self.groups.pp.world > 1:
            dist.all_reduce(total, group=self.groups.pp.group)
        norm = float(total.sqrt())
        if math.isfinite(norm):
            coef = min(1.0, max_norm / (norm + 1e-6))
            torch._foreach_mul_(grads, coef)
        return norm

    def align(self, plan: list[list[int]]) -> list[tuple[list[int], bool]]:
        # a TP x PP group's ranks train the same rows (parallel.mp_union); an EP group's ranks their own
        if self.groups.ep.world == 1:
            return [(rows, True) for rows in plan]
        most = max(self.parallel.gather(len(plan)))
        if not plan and most:
            raise RuntimeError("this rank has no rows while another has some: expert-parallel ranks need a share "
                               "each")  # fmt: skip
        return [(rows, True) for rows in plan] + [(plan[0], False)] * (most - len(plan))

    def shards(self, model: MegatronPolicy, dtype: torch.dtype | None) -> Any:
        params = dict(model.gpt.named_parameters())

        ep, pp = self.groups.ep, self.groups.pp
        device = next(model.gpt.parameters()).device

        def cast(p: Tensor) -> Tensor:  # before the gather: half the bytes moved and held with float32 main params
            t = p.detach()
            return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()

        def tp_parts(name: str, local: Tensor | None = None) -> list[Tensor]:
            local = cast(params[name]) if local is None else local
            if self.groups.tp == 1:
                return [local]
            parts = [torch.empty_like(local) for _ in range(self.groups.tp)]
            dist.all_gather(parts, local, group=self.groups.tp_group)
            return parts

        def shards_of(name: str) -> list[Tensor]:
            stage, owner, local_name = home(name, model.shape, pp.world, ep.world, model.split)
            if pp.rank == stage:
                if owner < 0:  # not an expert: whole on every EP rank, split over the TP group
                    parts = tp_parts(local_name)
                else:  # an expert: on one EP rank of the stage, under its local index there, split over TP
                    expert = cast(params[local_name])  # this TP rank's shard: the same shape on every EP rank
                    mine = expert if ep.rank == owner else torch.empty_like(expert)
                    dist.broadcast(mine, src=dist.get_global_rank(ep.group, owner), group=ep.group)
                    parts = tp_parts(local_name, mine)
            else:  # another stage holds it (PP > 1): its TP shards come over the PP group
                shape, held = self.stage_meta[stage][local_name]
                kind = dtype if dtype is not None and held.is_floating_point else held
                parts = [torch.empty(shape, dtype=kind, device=device) for _ in range(self.groups.tp)]
            if pp.world > 1:  # every (TP, EP) rank of the owning stage sends to its PP group
                for part in parts:
                    dist.broadcast(part, src=dist.get_global_rank(pp.group, stage), group=pp.group)
            return parts

        return shards_of

    def weights(self, model: nn.Module) -> Mapping[str, Tensor]:
        assert isinstance(model, MegatronPolicy)
        return StreamedWeights(lambda: iter_hf(self.shards(model, self.publish_dtype), model.shape))

    @property
    def sizes(self) -> reshard.Sizes:
        return reshard.Sizes(self.groups.tp, self.groups.pp.world, self.groups.ep.world, self.split.first,
                             self.split.last)  # fmt: skip

    def _files(self, directory: Path) -> tuple[Path, Path]:
        stem = reshard.stem(self.sizes, self.groups.tp_rank, self.groups.pp.rank, self.groups.ep.rank)
        return directory / f"{stem}.safetensors", directory / f"{stem}.pt"

    def save(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        assert isinstance(model, MegatronPolicy)
        sharded = isinstance(optimizer, ShardedAdamW)
        replicas = self.replicas
        if self.world.is_main:  # what another layout's resume reads first (reshard.py)
            reshard.write_sizes(directory, self.sizes, shards=replicas.world if sharded else 0)
        g = self.groups
        if sharded:  # every rank: the moments it owns, under one-stage names (found by name on resume)
            names = {id(p): n for n, p in model.gpt.named_parameters()}
            one_stage = reshard.placement(model.shape, self.sizes, g.pp.rank, g.ep.rank)
            owned = {one_stage[names[id(p)]]: s for p, s in optimizer.owned_state().items()}
            shard = reshard.shard_stem(self.sizes, g.tp_rank, g.pp.rank, g.ep.rank, replicas.rank)
            torch.save({"state": owned}, directory / f"{shard}.pt")
        if replicas.rank != 0:  # they hold the same shards and experts
            return
        tensors, state = self._files(directory)
        save_file({n: p.detach().contiguous() for n, p in model.gpt.named_parameters()}, str(tensors))
        adamw = (
            {"state": {}, "param_groups": [{**optimizer.hyperparameters(), "params": []}]}
            if sharded else optimizer.state_dict()
        )  # fmt: skip
        torch.save({"optimizer": adamw, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "param_names": reshard.optimizer_names(model.gpt, optimizer)}, state)  # fmt: skip

    def load(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        assert isinstance(model, MegatronPolicy)
        written = reshard.saved_sizes(directory)
        split_state = isinstance(optimizer, ShardedAdamW) or reshard.saved_shards(directory) > 0
        if written is not None and (written != self.sizes or split_state):
            # each rank rebuilds its shards (reshard.py); AdamW's state found by name
            coords = (self.groups.tp_rank, self.groups.pp.rank, self.groups.ep.rank)
            reshard.load_resharded(directory, written, self.sizes, coords, model, optimizer, scheduler)
            return
        tensors, state = self._files(directory)
        if not tensors.is_file():
            raise ValueError(f"it holds no {tensors.name} (not a megatron backend checkpoint)")
        saved = load_file(str(tensors))
        params = dict(model.gpt.named_parameters())
        if set(saved) != set(params):
            raise KeyError(f"{tensors.name} names other parameters: {sorted(set(saved) ^ set(params))[:4]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        extra = torch.load(state, weights_only=True)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])

    def export_hf(self, model: nn.Module, source: str, dest: Path) -> None:
        from transformers import AutoModelForCausalLM

        assert isinstance(model, MegatronPolicy)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model.config)  # type: ignore[no-untyped-call]
        # every rank: the gathers are collective; rank 0 writes each tensor into a shard as it comes, in the
        # parameters' dtype, holding one shard at a time
        export_streamed(skeleton, source, dest, iter_hf(self.shards(model, None), model.shape),
                        write=self.world.is_main)  # fmt: skip
