"""Where an evaluator's results go besides `{ns}:eval`: eval.jsonl (one line per version) and TensorBoard
(scalars under eval/, x axis = weight version)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

import structlog

from miles_stream.evaluation.record import EvalResult

log = structlog.get_logger(__name__)


class EvalFiles:
    """An append-only eval.jsonl and, when `tensorboard_dir` is set and tensorboard installed, a SummaryWriter.
    A callable sink (`Evaluator(sinks=[files])`); `close()` is idempotent."""

    def __init__(self, jsonl_path: str = "", tensorboard_dir: str = "") -> None:
        self.jsonl_path = jsonl_path
        self._file: TextIO | None = None  # opened at the first result: a process that fails to
        # start leaves no empty file behind
        self._tb: Any = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard_unavailable", hint="pip install tensorboard")
            else:
                self._tb = SummaryWriter(tensorboard_dir)

    def __call__(self, result: EvalResult) -> None:
        if self.jsonl_path and self._file is None:
            Path(self.jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.jsonl_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if self._file is not None:
            self._file.write(json.dumps(result.as_row()) + "\n")
        if self._tb is not None:
            for name, value in result.scalars().items():
                self._tb.add_scalar(name, value, result.version)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.jsonl_path = ""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
