"""Rendering of a `NamespaceStatus`: rich tables for people, JSON for scripts, a live view with --watch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import time
from typing import Any

import redis.asyncio as aioredis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from miles_stream.bus import Keys
from miles_stream.status.snapshot import NamespaceStatus, namespace_status


def render_json(status: NamespaceStatus) -> str:
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple | list):
            return [plain(v) for v in obj]
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    data = plain(status) | {"versions_in_use": status.versions_in_use, "producer_lag": status.producer_lag}
    return json.dumps(data, indent=2) + "\n"


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
    for group, n in status.done_groups.items():
        summary.add_row(f"groups committed by {group!r}", str(n))
    summary.add_row("as of", time.strftime("%Y-%m-%d %H:%M:%S"))
    return Group(streams, members, summary)


def render_tables(status: NamespaceStatus, console: Console | None = None) -> None:
    (console or Console()).print(build_view(status))


async def watch(redis: aioredis.Redis, keys: Keys, heartbeat_ttl_s: float, interval_s: float) -> None:
    """Redraw the status every `interval_s` until Ctrl-C (SIGINT), then raise KeyboardInterrupt. The signal
    sets an event the loop waits on, rather than cancelling the task: a cancel that lands inside a redis-py
    call can be swallowed (aio.stop_task), and the command then never exited."""
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        status = await namespace_status(redis, keys, heartbeat_ttl_s)
        with Live(build_view(status), refresh_per_second=4, screen=False) as live:
            while not interrupted.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupted.wait(), interval_s)
                if not interrupted.is_set():
                    live.update(build_view(await namespace_status(redis, keys, heartbeat_ttl_s)))
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    raise KeyboardInterrupt
