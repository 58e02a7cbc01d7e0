"""Rendering of a `NamespaceStatus`: rich tables for people, JSON for scripts, and with --watch the operators'
80-column view (`operator.py`) live on a terminal, or one snapshot after another into a file or a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import redis.asyncio as aioredis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from miles_stream.aio import stop_task
from miles_stream.bus import Keys
from miles_stream.status.operator import operator_lines
from miles_stream.status.snapshot import NamespaceStatus, Partitions, namespace_status


def render_json(status: NamespaceStatus, *, indent: int | None = 2) -> str:
    """The status as JSON; `indent=None` puts it on one line (one snapshot a line, with --watch)."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple | list):
            return [plain(v) for v in obj]
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    data = plain(status) | {"versions_in_use": status.versions_in_use, "producer_lag": status.producer_lag}
    return json.dumps(data, indent=indent) + "\n"


def build_view(status: NamespaceStatus) -> Group:
    streams = Table(title=f"namespace {status.namespace!r} on {status.server_version}", expand=False)
    key_width = max(len(s.key) for s in status.streams)
    streams.add_column("stream", no_wrap=True, min_width=key_width)
    for col in ("length", "group", "consumers", "pending", "lag", "last delivered"):
        streams.add_column(col, justify="right" if col in ("length", "consumers", "pending", "lag") else "left")
    for s in status.streams:
        if not s.groups:
            streams.add_row(s.key, str(s.length), "-", "", "", "", "")
        for i, g in enumerate(s.groups):
            lag = "?" if g.lag is None else str(g.lag)
            streams.add_row(
                s.key if i == 0 else "",
                str(s.length) if i == 0 else "",
                g.name,
                str(g.consumers),
                str(g.pending),
                lag,
                g.last_delivered_id,
            )
    members = Table(title="processes alive")
    for col in ("role", "id", "host", "pid", "last beat", "details"):
        members.add_column(col)
    for m in status.members:
        extra = {k: v for k, v in m.info.items() if k not in ("role", "id", "host", "pid", "started_at")}
        members.add_row(
            m.role,
            m.id,
            str(m.info.get("host", "")),
            str(m.info.get("pid", "")),
            f"{m.age_s:.1f}s ago",
            json.dumps(extra) if extra else "",
        )
    summary = Table.grid(padding=(0, 2))
    version = "none published" if status.latest_weight_version is None else str(status.latest_weight_version)
    summary.add_row("latest weight version", version)
    in_use = sorted(set(status.versions_in_use.values()))
    behind = status.producer_lag
    summary.add_row("versions producers use", ", ".join(map(str, in_use)) or "-")
    summary.add_row("producer staleness (versions)", "-" if behind is None else str(behind))
    summary.add_row("dead letters", str(status.dead_letters))
    for r in status.evals:
        at_k = ", ".join(f"pass@{k} {v:.3f}" for k, v in sorted(r.pass_at_k.items()))
        summary.add_row(f"last eval ({r.evaluator_id})", f"v{r.version}: greedy pass@1 {r.pass_at_1:.3f}"
                        + (f", sampled {at_k}" if at_k else "") + f", reward {r.reward_mean:.3f}")  # fmt: skip
    for group, n in status.done_groups.items():
        summary.add_row(f"groups committed by {group!r}", str(n))
    summary.add_row("as of", time.strftime("%Y-%m-%d %H:%M:%S"))
    return Group(streams, members, summary)


def render_tables(status: NamespaceStatus, console: Console | None = None) -> None:
    (console or Console()).print(build_view(status))


async def watch(
    redis: aioredis.Redis,
    keys: Keys,
    heartbeat_ttl_s: float,
    interval_s: float,
    *,
    as_json: bool = False,
    partitions: Partitions = (),
) -> None:
    """Show the status every `interval_s` until SIGINT (Ctrl-C: raises KeyboardInterrupt, so the command exits
    130) or SIGTERM (returns: exit 0). On a terminal, without `as_json`, one live table redrawn in place;
    otherwise (a file or a pipe, where a live view prints nothing) one snapshot after another, flushed: the
    tables, or with `as_json` one JSON object per line. The signals set an event the loop waits on, rather
    than cancelling the task: a cancel that lands inside a redis-py call can be swallowed (aio.stop_task),
    and the command then never exited."""
    stopped = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stopped.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if as_json or not sys.stdout.isatty():
            await _print_snapshots(redis, keys, heartbeat_ttl_s, interval_s, stopped, as_json=as_json,
                                   partitions=partitions)  # fmt: skip
        else:
            await _live(redis, keys, heartbeat_ttl_s, interval_s, stopped, partitions)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt


async def _live(redis: aioredis.Redis, keys: Keys, ttl_s: float, interval_s: float, stopped: asyncio.Event,
                partitions: Partitions) -> None:  # fmt: skip
    status = await _snapshot(redis, keys, ttl_s, stopped, partitions)
    if status is None:
        return
    with Live(_operator(status, None), refresh_per_second=4, screen=False) as live:
        while not await _wait(stopped, interval_s):
            previous, status = status, await _snapshot(redis, keys, ttl_s, stopped, partitions)
            if status is None:
                return
            live.update(_operator(status, previous))


def _operator(status: NamespaceStatus, previous: NamespaceStatus | None) -> Text:
    return Text("\n".join(operator_lines(status, previous)), no_wrap=True)


async def _print_snapshots(
    redis: aioredis.Redis,
    keys: Keys,
    ttl_s: float,
    interval_s: float,
    stopped: asyncio.Event,
    *,
    as_json: bool,
    partitions: Partitions,
) -> None:
    status = await _snapshot(redis, keys, ttl_s, stopped, partitions)
    previous: NamespaceStatus | None = None
    while status is not None:
        try:
            if as_json:
                sys.stdout.write(render_json(status, indent=None))
            else:
                sys.stdout.write("\n".join([*operator_lines(status, previous), "", ""]))
            sys.stdout.flush()
        except BrokenPipeError:  # the reader went away (`| head`): stop, and keep Python's exit flush quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        if await _wait(stopped, interval_s):
            return
        previous, status = status, await _snapshot(redis, keys, ttl_s, stopped, partitions)


async def _wait(stopped: asyncio.Event, timeout_s: float) -> bool:
    """Whether `stopped` was set within `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopped.wait(), timeout_s)
    return stopped.is_set()


async def _snapshot(redis: aioredis.Redis, keys: Keys, ttl_s: float, stopped: asyncio.Event,
                    partitions: Partitions = ()) -> NamespaceStatus | None:  # fmt: skip
    """The namespace's status, or None if `stopped` is set first (the read is then abandoned: a slow or hung
    server does not hold up the exit)."""
    read = asyncio.ensure_future(namespace_status(redis, keys, ttl_s, partitions))
    stop = asyncio.ensure_future(stopped.wait())
    await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if read.done():
        return read.result()
    with contextlib.suppress(Exception):  # an error of a read we no longer want is not reported
        await stop_task(read, timeout_s=1.0)
    return None
