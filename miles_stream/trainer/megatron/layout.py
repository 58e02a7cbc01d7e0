"""`MegatronLayout`: the torch train step's `ModelLayout` (trainer/torch/layout.py) for a GPTModel split over a
tensor-parallel group and replicated over a data-parallel one.

    reduce_grads   sum over the DP group (one flat all-reduce; the TP ranks of a group saw the same batch, and
                   Megatron's layers already all-reduce what a TP split needs inside their backward); the q/k
                   norms' gradients summed over the TP group first: each rank normalises only its own heads
                   with the shared [d] weight (Megatron does the same in finalize_model_grads.py:353-356)
    clip_grads     global 2-norm: squares of TP-split parameters summed over the TP group, replicated ones
                   (the norms) counted once (on TP rank 0); then torch's clip rule (max_norm / (norm + 1e-6), at most 1)
    weights        each parameter's TP shards gathered in turn and converted to HF names (convert.iter_hf); every
                   rank holds the whole model while the mapping is built (not yet read tensor by tensor)
    save / load    DP rank 0 of each TP rank writes megatron-tp{k}.safetensors (its shards, Megatron names) and
                   megatron-tp{k}.pt (AdamW, schedule, torch RNG); every rank reads its TP rank's pair
    export_hf      the gathered HF tensors, saved by rank 0 under the source checkpoint's config and tokenizer
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from miles_stream.trainer.megatron.convert import iter_hf
from miles_stream.trainer.megatron.model import MegatronPolicy
from miles_stream.trainer.megatron.parallel import Groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import export_hf


class MegatronLayout:
    casts_compute = False

    def __init__(self, groups: Groups, world: DataParallel, model: MegatronPolicy) -> None:
        self.groups = groups
        self.parallel: DataParallel = groups.dp
        self.world = world
        named = list(model.gpt.named_parameters())
        self.tp_partial = [p for n, p in named if "q_layernorm" in n or "k_layernorm" in n]
        # whole on every TP rank: the norms. By name: Megatron marks split parameters (`tensor_model_parallel`)
        # only when it initialises them (tensor_parallel/layers.py:244-266, :855-886), which the backend skips
        self.replicated = {id(p) for n, p in named if n.endswith("layernorm.weight")}

    def reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        if self.groups.tp > 1:
            self.groups.tp_parallel.sum_grads([p for p in self.tp_partial if p.requires_grad])
        self.groups.dp.sum_grads(params)

    def clip_grads(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        first = self.groups.tp_rank == 0
        squares = [p.grad.float().pow(2).sum() for p in params
                   if p.grad is not None and (first or id(p) not in self.replicated)]  # fmt: skip
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=grads[0].device)
        if self.groups.tp > 1:
            dist.all_reduce(total, group=self.groups.tp_group)
        norm = float(total.sqrt())
        if math.isfinite(norm):
            coef = min(1.0, max_norm / (norm + 1e-6))
            torch._foreach_mul_(grads, coef)
        return norm

    def align(self, plan: list[list[int]]) -> list[tuple[list[int], bool]]:
        return [(rows, True) for rows in plan]  # a TP group's ranks train the same rows (parallel.tp_union)

    def shards(self, model: MegatronPolicy) -> Any:
        params = dict(model.gpt.named_parameters())

        def shards_of(name: str) -> list[Tensor]:
            local = params[name].detach().contiguous()
            if self.groups.tp == 1:
                return [local]
            parts = [torch.empty_like(local) for _ in range(self.groups.tp)]
            dist.all_gather(parts, local, group=self.groups.tp_group)
            return parts

        return shards_of

    def weights(self, model: nn.Module) -> Mapping[str, Tensor]:
        assert isinstance(model, MegatronPolicy)
        return dict(iter_hf(self.shards(model), model.shape))

    def _files(self, directory: Path) -> tuple[Path, Path]:
        stem = f"megatron-tp{self.groups.tp_rank:02d}"
        return directory / f"{stem}.safetensors", directory / f"{stem}.pt"

    def save(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        assert isinstance(model, MegatronPolicy)
        if self.groups.dp.rank != 0:  # the DP replicas hold the same shards
            return
        tensors, state = self._files(directory)
        save_file({n: p.detach().contiguous() for n, p in model.gpt.named_parameters()}, str(tensors))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, state)  # fmt: skip

    def load(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        assert isinstance(model, MegatronPolicy)
        tensors, state = self._files(directory)
        if not tensors.is_file():
            raise ValueError(f"it holds no {tensors.name} (not saved by the megatron backend at this TP size)")
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
        state = dict(self.weights(model))  # every rank: the gathers are collective
        if self.world.is_main:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(model.config)  # type: ignore[no-untyped-call]
            export_hf(skeleton, source, dest, state_dict=state)
