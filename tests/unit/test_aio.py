"""`aio.stop_task`: a background loop stops even if one cancellation is swallowed, and a stuck one is reported."""

from __future__ import annotations

import asyncio

import pytest

from miles_stream.aio import stop_task


async def test_a_loop_that_swallows_one_cancel_still_stops() -> None:
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:  # as redis-py did once, inside a connection timeout
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.02)
    assert await stop_task(task, timeout_s=5)
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_never_ends_is_reported_and_a_failure_is_raised() -> None:
    release = False

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if release:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.01)  # inside its loop
    assert not await stop_task(task, timeout_s=0.3)
    release = True
    assert await stop_task(task)

    async def failing() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="boom"):
        await stop_task(failed)
