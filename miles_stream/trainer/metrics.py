"""Per-step metrics: the structured log, a JSONL file (one object per step) and TensorBoard when installed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class MetricsSink:
    def __init__(self, jsonl_path: str = "", tensorboard_dir: str = "") -> None:
        self._file = None
        if jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(jsonl_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._tb: Any = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard_unavailable", hint="pip install tensorboard")
            else:
                self._tb = SummaryWriter(tensorboard_dir)

    def write(self, step: int, metrics: Mapping[str, float | int]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        log.info("train_step", **row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value: float | int) -> float | int:
    return round(value, 6) if isinstance(value, float) else value
