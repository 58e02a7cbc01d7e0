"""`aio.run_process`: SIGTERM / Ctrl-C set the stop event; a main loop that does not finish in its grace is
cancelled (`StopTimeout`, one line), and a process still not done shortly after exits at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from miles_stream import aio
from miles_stream.errors import StopTimeout


def test_a_main_loop_that_stops_when_told_returns_its_result() -> None:
    async def main(stop: asyncio.Event) -> str:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 30)
        return "clean"

    assert aio.run_process(main, what="the test", grace_s=30) == "clean"


def test_a_main_loop_that_ignores_the_stop_is_cancelled_after_its_grace() -> None:
    async def main(stop: asyncio.Event) -> str:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)
        await asyncio.sleep(60)  # never looks at `stop`
        return "never"

    began = time.monotonic()
    exits: list[tuple[str, str]] = []
    with pytest.raises(StopTimeout, match=r"the test did not finish cleanly \(0.2 s after SIGINT\)"):
        aio.run_process(main, what="the test", grace_s=0.2, exit_grace_s=30,
                        hard_exit=lambda what, why: exits.append((what, why)))  # fmt: skip
    assert time.monotonic() - began < 30


def test_a_second_signal_hurries_only_when_it_is_a_second_request() -> None:
    """A terminal's Ctrl-C reaches a whole process group and a supervisor may SIGTERM just after: the same
    request, which keeps its grace. One SECOND_SIGNAL_S or more later cancels at once."""

    async def main(stop: asyncio.Event) -> str:
        loop = asyncio.get_running_loop()
        loop.call_soon(os.kill, os.getpid(), signal.SIGINT)
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)  # the supervisor's, at once
        await asyncio.wait_for(stop.wait(), 30)
        await asyncio.sleep(0.5)  # finishing cleanly within the grace, after both signals
        return "clean"

    assert aio.run_process(main, what="the test", grace_s=30) == "clean"

    async def slow(stop: asyncio.Event) -> str:
        loop = asyncio.get_running_loop()
        loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
        loop.call_later(aio.SECOND_SIGNAL_S + 0.2, os.kill, os.getpid(), signal.SIGTERM)  # asked again, later
        await asyncio.sleep(60)
        return "never"

    exits: list[tuple[str, str]] = []
    began = time.monotonic()
    with pytest.raises(StopTimeout, match="a second SIGTERM"):
        aio.run_process(slow, what="the test", grace_s=30, exit_grace_s=30,
                        hard_exit=lambda what, why: exits.append((what, why)))  # fmt: skip
    assert time.monotonic() - began < 20


def test_a_process_stuck_in_a_thread_exits_with_one_line() -> None:
    """The loop's shutdown waits for its worker threads (a training step): the process exits regardless."""
    script = textwrap.dedent("""
        import asyncio, time
        from miles_stream import aio

        async def main(stop):
            print("ready", flush=True)
            await asyncio.to_thread(time.sleep, 120)  # a step that will not end soon

        aio.run_process(main, what="the stuck one", grace_s=0.5, exit_grace_s=0.5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3
    assert err.strip().splitlines()[-1].startswith("miles-stream: the stuck one did not stop (0.5 s after SIGTERM")
