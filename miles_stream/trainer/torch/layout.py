"""How the policy is spread over the data-parallel ranks, as `PolicyTrainer` sees it.

`Replicated` (here): every rank holds the whole model, AdamW's whole state and whole gradients; gradients are
summed over ranks after the backward passes (parallel.py). `Fsdp` (fsdp.py): each rank holds 1/N of each,
FSDP2 gathers a layer's parameters around its forward and backward and reduce-scatters its gradients. The
train step (policy.py) is the same for both; what differs is behind these methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import export_hf
from miles_stream.trainer.torch.optim import build_optimizer
from miles_stream.trainer.torch.state import read_state, write_state


class Pipeline(Protocol):
    """How a model cut into pipeline stages runs a step's micro-batches (the Megatron backend's, pipeline.py)."""

    last_stage: bool  # computes the loss; the other stages hand their hidden states on and gradients back

    def order(self, count: int) -> list[tuple[bool, int]]:
        """(forward or backward, micro-batch index) in the order this stage runs them."""
        ...

    def step(self) -> AbstractContextManager[None]:
        """Around a step's micro-batches: the stage hand-offs in flight are complete when it exits."""
        ...

    def share(self, metrics: dict[str, float]) -> dict[str, float]:
        """The last stage's step metrics, on every stage."""
        ...


class ModelLayout(Protocol):
    parallel: DataParallel
    casts_compute: bool  # the layout computes in the compute dtype itself (FSDP's mixed precision): no autocast
    aligns_frozen: bool  # a frozen model's forward is a collective too (expert parallel): `align` its micro-batches

    @property
    def pipeline(self) -> Pipeline | None:
        """None: each micro-batch's forward, then its backward, on one model."""
        ...

    def optimizer(self, params: Sequence[nn.Parameter], config: TrainerConfig) -> torch.optim.Optimizer:
        """AdamW over the trained `params` (a layout may split its state over ranks)."""
        ...

    def reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        """After the last backward pass of a step: make every rank's gradients the sum over ranks."""
        ...

    def clip_grads(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        """Scale gradients to a global 2-norm of at most `max_norm`; returns the norm before (every rank alike)."""
        ...

    def align(self, plan: list[list[int]]) -> list[tuple[list[int], bool]]:
        """This rank's micro-batches, each with whether it is real; a layout whose forward passes are
        collectives pads every rank to the same count with repeats marked False (they add nothing)."""
        ...

    def weights(self, model: nn.Module) -> Mapping[str, Tensor]:
        """The model's full tensors under HF names; every rank reads all of them, in order (see backend.py)."""
        ...

    def save(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None: ...

    def load(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None: ...

    def export_hf(self, model: nn.Module, source: str, dest: Path) -> None: ...


class Replicated:
    casts_compute = False
    aligns_frozen = False
    pipeline = None

    def __init__(self, parallel: DataParallel) -> None:
        self.parallel = parallel

    def optimizer(self, params: Sequence[nn.Parameter], config: TrainerConfig) -> torch.optim.Optimizer:
        return build_optimizer(params, config)

    def reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        self.parallel.sum_grads(params)

    def clip_grads(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def align(self, plan: list[list[int]]) -> list[tuple[list[int], bool]]:
        return [(rows, True) for rows in plan]

    def weights(self, model: nn.Module) -> Mapping[str, Tensor]:
        return model.state_dict()

    def save(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        if self.parallel.is_main:  # every rank holds the same: one writes
            write_state(directory, model, optimizer, scheduler, critic)

    def load(self, directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any) -> None:
        read_state(directory, model, optimizer, scheduler, critic)

    def export_hf(self, model: nn.Module, source: str, dest: Path) -> None:
        if self.parallel.is_main:
            export_hf(model, source, dest)
