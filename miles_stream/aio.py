"""Running a coroutine as a process's main loop: uvloop where it is installed, asyncio otherwise; and the one
way every process stops when told (`run_process`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from miles_stream.errors import StopTimeout

T = TypeVar("T")
STOP_GRACE_S = 6.0  # after SIGTERM / Ctrl-C: time to finish cleanly (hand work back, checkpoint, commit)
EXIT_GRACE_S = 2.0  # then the main task is cancelled; this long after that the process exits regardless
SECOND_SIGNAL_S = 1.0  # a second signal this soon after the first is the same request (a terminal's Ctrl-C
# reaches a whole process group, and a supervisor may send SIGTERM just after): only a later one hurries


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


def run_process(main: Callable[[asyncio.Event], Awaitable[T]], *, what: str, grace_s: float = STOP_GRACE_S,
                exit_grace_s: float = EXIT_GRACE_S,
                hard_exit: Callable[[str, str], None] | None = None) -> T:  # fmt: skip
    """Run a process's main loop `main(stop)`: SIGINT and SIGTERM set `stop`, and `main` is expected to finish
    cleanly soon after.

    Every process stops within seconds of being told, whatever it is waiting on (a Redis that is gone, a full
    stream with no reader, a retry loop): `grace_s` after the first signal the main task is cancelled and
    `StopTimeout` names what did not finish; `exit_grace_s` later (a worker thread still in a training step
    that the loop's shutdown waits for, a cancel swallowed inside a client library) the process writes one line
    and exits at once, as kill -9 would: what it had not committed stays pending in Redis for another process.
    A second signal (SECOND_SIGNAL_S or more after the first) cancels at once. `hard_exit` replaces the exit
    (tests)."""
    hard: list[threading.Timer] = []
    exit_now = hard_exit or _exit_now
    try:
        return run(_until_stopped(main, what, grace_s, exit_grace_s, hard, exit_now))
    finally:
        for timer in hard:
            timer.cancel()
        if hard:  # stopped where it was: what is left (joining worker threads blocked on a dead server at
            # interpreter exit, a process group's teardown) gets exit_grace_s more, then the process goes
            last = threading.Timer(exit_grace_s, exit_now, args=(what, "shutting down after the cancel"))
            last.daemon = True
            last.start()


async def _until_stopped(main: Callable[[asyncio.Event], Awaitable[T]], what: str, grace_s: float,
                         exit_grace_s: float, hard: list[threading.Timer],
                         exit_now: Callable[[str, str], None]) -> T:  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.ensure_future(main(stop))
    timed_out: list[str] = []
    soft: list[asyncio.TimerHandle] = []
    first_signal: list[float] = []  # when the first signal came (the stop event is also set by the code itself)

    def cancel(why: str) -> None:
        if not task.done() and not timed_out:
            timed_out.append(why)
            task.cancel()
            timer = threading.Timer(exit_grace_s, exit_now, args=(what, why))
            timer.daemon = True
            timer.start()
            hard.append(timer)

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if first_signal:
            if loop.time() - first_signal[0] >= SECOND_SIGNAL_S:
                cancel(f"a second {name}")
            return
        first_signal.append(loop.time())
        stop.set()
        soft.append(loop.call_later(grace_s, cancel, f"{grace_s:g} s after {name}"))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        while True:  # a cancel swallowed by a client library is repeated until the task ends
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                break
            if timed_out:
                task.cancel()
        if task.cancelled() and timed_out:
            raise StopTimeout(f"{what} did not finish cleanly ({timed_out[0]}): stopped where it was; what it had "
                              "not committed stays pending for another process")  # fmt: skip
        return task.result()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for handle in soft:
            handle.cancel()


def _exit_now(what: str, why: str) -> None:
    sys.stderr.write(f"miles-stream: {what} did not stop ({why}, then cancelled): exiting now; what it had not "
                     "committed stays pending for another process\n")  # fmt: skip
    sys.stderr.flush()
    os._exit(3)
