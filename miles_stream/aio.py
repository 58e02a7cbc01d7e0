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


async def stop_task(task: asyncio.Task[Any], timeout_s: float = 10.0) -> bool:
    """Cancel `task` and wait until it ends; False if it is still running after `timeout_s`. The cancel is
    repeated every 0.1 s: redis-py has been seen to swallow a CancelledError that lands at an unlucky moment
    (inside its connection timeouts), and a loop whose one cancel was lost would run on while the caller waited
    for it forever (a trainer that never exited did, in CI). An exception the task ended with is raised."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
        if asyncio.get_running_loop().time() > deadline and not task.done():
            return False
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc
    return True
