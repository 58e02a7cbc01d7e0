"""Waiting for a condition with a deadline, for process-level tests (never sleep-and-assert). Importable from any
test: the conftest beside it puts tests/ on sys.path."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
