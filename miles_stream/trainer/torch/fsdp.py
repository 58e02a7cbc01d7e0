"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied to a built Hugging Face causal LM, and `Fsdp`, the
`ModelLayout` of a sharded policy (trainer.fsdp.enabled).

    shard(model):  fully_shard(each decoder layer) ─► fully_shard(model): the root group holds the rest
                   (embeddings, final norm, output layer; tied or not)
    a parameter:   a DTensor, Shard(0) over the N data-parallel ranks: each rank keeps 1/N of its rows, its
                   gradient's rows and AdamW's two moments for them (float32)
    forward:       the root's entry gathers the root group; each layer gathers its group before it runs and
                   frees it after (reshard_after_forward), in bf16 under mixed precision
    backward:      each layer gathers again, computes, reduce-scatters its gradients (float32, SUM: the loss is
                   already divided by the global token count, as in the replicated layout)

Every forward and backward is a collective, so every rank runs the same number of micro-batches: `align`
pads the short ranks with repeats whose loss is multiplied by zero. The trainer's fused logprobs read the
output layer's weight outside any module's forward; the root therefore gets the logprob function as a
registered FSDP forward method (`logprobs.SHARDED_ENTRY`), which gathers the root group around it and hooks
its gradients, as `forward` would.

Publication (`weights`): one parameter at a time is gathered (`DTensor.full_tensor`, cast to the publish
dtype first, so bf16 crosses the wire), handed to the reader and dropped: the publishing rank copies it into
its snapshot, the others let it go; no rank ever holds more than its shards, the snapshot and one gathered
parameter. Checkpoints: torch.distributed.checkpoint, one file of shards per rank plus metadata.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import decoder_layers, export_hf
from miles_stream.trainer.torch.logprobs import SHARDED_ENTRY, logprobs_of
from miles_stream.trainer.torch.optim import build_optimizer

log = structlog.get_logger(__name__)
SHARDS = "shards"  # the checkpoint's subdirectory written by torch.distributed.checkpoint
SCHEDULE = "schedule.pt"  # the learning-rate schedule and torch RNG (the same on every rank: rank 0 writes)


def mixed_precision(config: TrainerConfig) -> bool:
    """bf16 compute over float32 shards: trainer.dtype bfloat16 with trainer.fsdp.mixed_precision auto."""
    return config.fsdp.mixed_precision == "auto" and config.dtype == "bfloat16"


def shard(model: nn.Module, config: TrainerConfig, parallel: DataParallel) -> DeviceMesh:
    """Shard `model` in place over the `parallel.world` ranks (a process group must be up); returns the mesh."""
    if not torch.distributed.is_initialized():
        raise RuntimeError("trainer.fsdp needs torch.distributed initialised (launch the trainer with torchrun)")
    device = torch.device(config.device)
    mesh = init_device_mesh(device.type, (parallel.world,))
    policy = MixedPrecisionPolicy()
    if mixed_precision(config):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if config.fsdp.cpu_offload else OffloadPolicy()
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy, "offload_policy": offload,
                              "reshard_after_forward": config.fsdp.reshard_after_forward}  # fmt: skip
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no *DecoderLayer modules to shard one by one")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    setattr(model, SHARDED_ENTRY, functools.partial(_logprobs, model))
    register_fsdp_forward_method(model, SHARDED_ENTRY)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # summed, not averaged: the loss is divided globally
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
            module.set_reduce_scatter_unused_params(True, recurse=False)  # an MoE expert one rank left unused
    log.info("fsdp_sharded", ranks=parallel.world, layers=len(layers), mixed_precision=mixed_precision(config),
             cpu_offload=config.fsdp.cpu_offload)  # fmt: skip
    return mesh


def _logprobs(model: nn.Module, x: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """`logprobs_of`, its outputs cloned: FSDP hooks the backward of what the entry returns, and a view (the
    kernel's `.view(b, t)`) would lose that hook to an in-place op (torch warns so)."""
    logp, entropy = logprobs_of(model, x, **kwargs)
    return logp.clone(), entropy.clone()


class GatheredWeights(Mapping[str, Tensor]):
    """A sharded model's state under HF names; reading a tensor gathers it (a collective: every rank must
    read every tensor, in the same order). Floating tensors come cast to `dtype` when given."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        self._state = model.state_dict()  # DTensors: references to the shards, no copy
        self._dtype = dtype

    def __getitem__(self, name: str) -> Tensor:
        tensor: Tensor = self._state[name].detach()
        if self._dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self._dtype)
        if isinstance(tensor, DTensor):
            gathered: Tensor = tensor.full_tensor()
            return gathered
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class Fsdp:
    """The `ModelLayout` of a model that `shard` has sharded."""

    aligns_frozen = False  # only the policy is sharded
    pipeline = None

    def __init__(self, parallel: DataParallel, config: TrainerConfig) -> None:
        self.parallel = parallel
        self.casts_compute = mixed_precision(config)
        self.publish_dtype = torch.bfloat16 if self.casts_compute else None

    def optimizer(self, params: Sequence[nn.Parameter], config: TrainerConfig) -> torch.optim.Optimizer:
        return build_optimizer(params, config)  # over the DTensor shards: each rank's moments are its rows'

    def reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        return None  # FSDP reduce-scattered each layer's gradients in the backward pass

    def clip_grads(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(total, DTensor):  # per-rank partial norms: reduced into the global one
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return float(total)

    def align(self, plan: list[list[int]]) -> list[tuple[list[int], bool]]:
        most = max(self.parallel.gather(len(plan)))
        if not plan and most:
            raise RuntimeError("this rank has no rows while another has some: FSDP ranks need a share each")
        return [(rows, True) for rows in plan] + [(plan[0], False)] * (most - len(plan))

    def weights(self, model: nn.Module) -> Mapping[str, Tensor]:
        return GatheredWeights(model, self.publish_dtype)

    def save(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        _no_critic(critic)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / SHARDS)
        if self.parallel.is_main:
            torch.save({"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                       directory / SCHEDULE)  # fmt: skip

    def load(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        _no_critic(critic)
        if not (directory / SHARDS / ".metadata").is_file():
            raise ValueError(f"it holds no {SHARDS}/ (saved without trainer.fsdp, or by another layout)")
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp_load({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / SHARDS)  # in place
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        saved = torch.load(directory / SCHEDULE, weights_only=True)
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])

    def export_hf(self, model: nn.Module, source: str, dest: Path) -> None:
        """Gather the full state onto rank 0's CPU (the others get nothing) and save it there."""
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.parallel.is_main:
            # a tied output layer is the embedding under a second name: saved once, as save_pretrained does
            named = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
            export_hf(model, source, dest, state_dict={n: t for n, t in full.items() if n in named})


def _no_critic(critic: Any) -> None:
    if critic is not None:
        raise ValueError("trainer.fsdp does not shard PPO's critic (build.py refuses that combination)")
