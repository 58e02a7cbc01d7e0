"""Running a coroutine as a process's main loop: uvloop where it is installed, asyncio otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # uvloop does not build on every platform; asyncio's loop is the fallback
        return asyncio.run(main)
    return uvloop.run(main)
