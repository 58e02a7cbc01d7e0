"""`WeightsGroupConfig`: the `weights_group` section, for the broadcast transport (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from miles_stream.config import check


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightsGroupConfig:
    master_address: str = "127.0.0.1"  # the trainer's host, as the producers reach it
    master_port: int = 29700
    receivers: int = 1  # producers in the group (ranks 1..receivers); the trainer waits for all of them
    backend: str = "nccl"  # gloo: CPU (tests)
    device: str = "cuda"  # where tensors travel from / arrive on
    dtype: str = "bfloat16"  # floating tensors travel as this (both ends allocate from it, so they agree)
    group_name: str = "miles-weights"
    timeout_s: float = 1800.0  # joining, and each broadcast: a receiver waits this long for the next version

    def __post_init__(self) -> None:
        check(self.receivers >= 1, "weights_group.receivers", "must be >= 1")
        check(self.backend in ("nccl", "gloo"), "weights_group.backend", "must be nccl or gloo")
        check(self.timeout_s > 0, "weights_group.timeout_s", "must be positive")
        check(self.dtype in ("bfloat16", "float16", "float32"), "weights_group.dtype", "bfloat16, float16 or float32")
