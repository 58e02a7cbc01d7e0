"""`TrainerBackend`: what the training loops (service.py for RL, sft.py) need from whatever trains the model.

A backend owns the model, its parallelism, its optimizer and its forward passes; it takes the shared, pure
math (`algo.build_objective`, `algo.compute_advantages`) and applies it. The loops, the replay buffer, the
checkpoint protocol and weight publication do not know which backend runs. The torch backend is `torch/`
(replicated, or sharded by FSDP2 with trainer.fsdp: torch/fsdp.py); a new one (Megatron-core) is one package
beside it and one entry in `backends.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.parallel import DataParallel

if TYPE_CHECKING:
    import torch


class TrainerBackend(Protocol):
    parallel: DataParallel

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """This rank's share of a batch in, `updates_per_batch` optimizer steps; metrics averaged over ranks."""
        ...

    def weights(self) -> tuple[Mapping[str, torch.Tensor], torch.dtype | None]:
        """The policy's full tensors under Hugging Face names, for publication to the engines, and the dtype
        to publish floating tensors in (None: as they are). Called on every rank; every rank reads every
        tensor once, in the mapping's order (a sharded backend gathers each one as it is read: a collective);
        the publishing rank keeps what it reads, the others drop it."""
        ...

    def save(self, directory: Path) -> None:
        """Write the model, optimizer and schedule state into a checkpoint directory being built. Called on
        every rank with the same directory (rank 0's, checkpoint.save_checkpoint_ranks): each writes its part."""
        ...

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote; raise OSError / ValueError / RuntimeError / KeyError if it cannot."""
        ...

    def export_hf(self, dest: Path) -> None:
        """Save the policy as a Hugging Face checkpoint (config and tokenizer of trainer.model). Called on
        every rank; rank 0 writes."""
        ...

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: token ids at or above it are refused on the wire (0: unknown)."""
        ...
