"""A checkpoint's claims name their partition (`bus.partitions`), and the checkpoint records the count: resumed
with another, its claims would be committed in keys of another layout (acking unrelated entries, or IndexError),
so the trainer refuses it in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from miles_stream.bus import Claim
from miles_stream.errors import ConfigError
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from miles_stream.trainer.service import TrainerService


def nothing(path: Path) -> None:
    """The backend's files: none needed to check the protocol's own."""


def test_claims_keep_their_partition_and_the_count_through_a_checkpoint(tmp_path: Path) -> None:
    claims = (Claim("1-0", "e0-i0", 0), Claim("1-1", "e0-i1", 1), Claim("2-0", "e0-i5", 2))
    state = TrainerState(step=4, version=4, claims=claims, run_id="r", recent=("e0-i3",), partitions=3)
    save_checkpoint(tmp_path, state, nothing)
    assert load_checkpoint(tmp_path, nothing) == state


def test_a_checkpoint_resumes_only_with_the_partition_count_it_was_taken_with(tmp_path: Path) -> None:
    service = TrainerService.__new__(TrainerService)  # only the resume check
    service.config = SimpleNamespace(checkpoint_dir=str(tmp_path))  # type: ignore[assignment]
    service.run_identity, service.namespace = None, "{run1}"
    state = TrainerState(step=4, version=4, claims=(Claim("1-0", "e0-i1", 1),), partitions=3)
    for ours in (1, 2):
        service.partitions = ours
        with pytest.raises(ConfigError, match=rf"taken with 3 partition\(s\); this trainer has {ours}"):
            service._check_same_run(state)
    service.partitions = 3
    service._check_same_run(state)
    service._check_same_run(TrainerState(step=1, version=1, claims=()))  # a checkpoint from before the count: as is
    service.partitions = 0  # `train --replay`: no streams, its claims go nowhere
    service._check_same_run(state)
