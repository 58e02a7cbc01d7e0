"""`BufferConfig`: how the replay buffer turns the trajectory stream into batches (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles_stream.buffer.filters import FILTERS
from miles_stream.config import check


@dataclass(frozen=True, slots=True, kw_only=True)
class BufferConfig:
    rollout_batch_size: int = 8  # groups per training batch, all data-parallel ranks together
    max_staleness: int = 2  # a group whose oldest token is more versions behind the trainer is stale; -1 = no bound
    stale: Literal["drop", "recycle"] = "drop"  # recycle: its prompt goes back on {ns}:prompts for a fresh try
    filters: tuple[str, ...] = ("reward_variance",)  # dynamic filters, by name (buffer/filters.py)
    capacity: int = 64  # groups one rank holds ahead of training; past it the buffer stops reading, the stream lags
    read_count: int = 8  # groups asked for per XREADGROUP

    def __post_init__(self) -> None:
        check(self.rollout_batch_size >= 1, "buffer.rollout_batch_size", "must be >= 1")
        check(self.max_staleness >= -1, "buffer.max_staleness", "must be >= 0, or -1 for no bound")
        check(self.stale in ("drop", "recycle"), "buffer.stale", "allowed: drop, recycle")
        check(self.capacity >= 1, "buffer.capacity", "must be >= 1 (and at least one rank's share of a batch)")
        check(self.read_count >= 1, "buffer.read_count", "must be >= 1")
        for name in self.filters:
            check(name in FILTERS, "buffer.filters", f"unknown filter {name!r}; known: {sorted(FILTERS)}")

    def is_stale(self, oldest_version: int, current_version: int) -> bool:
        return self.max_staleness >= 0 and current_version - oldest_version > self.max_staleness
