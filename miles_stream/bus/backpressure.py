"""Backpressure: a producer waits while the consumers' backlog on a stream exceeds a bound.

The backlog of a consumer group is what it has not acknowledged: entries not yet delivered plus entries
delivered and pending, both counted exactly on every server. Redis 7+ and Valkey report the undelivered
count (`lag` in XINFO GROUPS); where it is missing (Redis 6.2, or 7.x when deletions make it unknown) the
entries after the group's last-delivered id are counted with one `XRANGE (id + COUNT cap`, capped at what
the caller needs to know (the bound it compares with). That read costs the server, and the wire, up to `cap`
entries per poll: fine for small entries or small bounds; with large entries use a server that reports lag.
Bytes are estimated from the sizes this producer has been sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from miles_stream.bus.keys import observers_of
from miles_stream.bus.streams import BusConfig, as_str, no_such_key
from miles_stream.errors import BackpressureTimeout

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Backlog:
    entries: int
    bytes: int

    def exceeds(self, config: BusConfig) -> bool:
        return self.entries >= config.max_backlog_entries or self.bytes >= config.max_backlog_bytes


@dataclass(frozen=True, slots=True)
class GroupBacklog:
    """What one consumer group has not acknowledged: `undelivered` (exact up to the cap asked for) and
    `pending` (delivered, not acknowledged)."""

    undelivered: int
    pending: int

    @property
    def unacked(self) -> int:
        return self.undelivered + self.pending


async def stream_backlog(redis: aioredis.Redis, stream: str, cap: int = 1 << 20) -> int:
    """Largest unacknowledged count over the stream's consumer groups that consume the run (the stream length
    if none).

    Observer groups (`keys.observers_of`: the recorder, a future evaluator) are not counted, live or dead: an
    observer must never stop the run it observes. A recorder whose disk filled left its group behind, its lag
    grew to `max_backlog_entries` and every producer blocked until someone restarted it. What a slow or dead
    observer loses instead is said in `streams.trim_acknowledged`. Only groups that are not observers count:
    rather than guessing a consumer's liveness (a trainer checkpointing for minutes reads nothing and must
    still hold producers back), the observer says what it is when it starts.
    """
    length, groups, observers = await _length_and_groups(redis, stream)
    groups = [g for g in groups if as_str(g["name"]) not in observers]
    if not groups:
        return length
    return max([(await _group_backlog(redis, stream, g, cap)).unacked for g in groups])


async def group_backlog(redis: aioredis.Redis, stream: str, group: str, cap: int = 1 << 20) -> GroupBacklog:
    """The backlog of consumer group `group` on `stream` (the whole stream if that group does not exist)."""
    length, groups, _ = await _length_and_groups(redis, stream)
    for g in groups:
        if as_str(g["name"]) == group:
            return await _group_backlog(redis, stream, g, cap)
    return GroupBacklog(length, 0)


async def _group_backlog(redis: aioredis.Redis, stream: str, info: dict[Any, Any], cap: int) -> GroupBacklog:
    lag = info.get("lag")
    if lag is None:  # 6.2: count what follows the last-delivered id, at most `cap` (module docstring)
        after: Any = await redis.xrange(stream, min=f"({as_str(info['last-delivered-id'])}", max="+", count=cap)
        lag = len(after)
    return GroupBacklog(int(lag), int(info["pending"]))


async def _length_and_groups(redis: aioredis.Redis, stream: str) -> tuple[int, list[Any], set[str]]:
    """XLEN, XINFO GROUPS and the observer groups in one round trip; (0, [], set()) while the stream does not
    exist."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.hkeys(observers_of(stream))
        try:
            length, groups, observers = await pipe.execute()
        except rexc.ResponseError as exc:  # no such key yet
            if no_such_key(exc):
                return 0, [], set()
            raise
    return int(length), list(groups), {as_str(o) for o in observers}


class Backpressure:
    """Blocks a producer while the backlog on `stream` is at or over its bound. Polls at most every
    `backpressure_poll_s`, so a hundred producers cost Redis a hundred small reads per poll interval."""

    def __init__(self, redis: aioredis.Redis, stream: str, config: BusConfig) -> None:
        self.redis, self.stream, self.config = redis, stream, config
        self._avg_bytes = 0.0
        self._checked_at = -1e9
        self._last_entries = 0
        self._sent_since_check = 0
        self.waiting = False  # in wait_for_room, over the bound (heartbeats carry it to `status --watch`)

    def record_sent(self, nbytes: int) -> None:
        """Call after each publish: counts toward the backlog until the next check sees it in Redis."""
        self._avg_bytes = nbytes if not self._avg_bytes else 0.9 * self._avg_bytes + 0.1 * nbytes
        self._sent_since_check += 1

    async def backlog(self) -> Backlog:
        now = time.monotonic()
        if now - self._checked_at >= self.config.backpressure_poll_s:
            self._last_entries = await stream_backlog(self.redis, self.stream, cap=self.config.max_backlog_entries)
            self._sent_since_check = 0
            self._checked_at = now
        entries = self._last_entries + self._sent_since_check
        return Backlog(entries, int(entries * self._avg_bytes))

    async def wait_for_room(self, timeout_s: float | None = None, stop: asyncio.Event | None = None) -> None:
        """Return once the backlog is under its bound, or as soon as `stop` is set (the caller checks it)."""
        try:
            await self._wait_for_room(timeout_s, stop)
        finally:
            self.waiting = False

    async def _wait_for_room(self, timeout_s: float | None, stop: asyncio.Event | None) -> None:
        start = time.monotonic()
        logged = False
        while (backlog := await self.backlog()).exceeds(self.config):
            self.waiting = True
            if stop is not None and stop.is_set():
                return
            waited = time.monotonic() - start
            if timeout_s is not None and waited >= timeout_s:
                raise BackpressureTimeout(
                    f"backlog on {self.stream} stayed at {backlog.entries} entries / {backlog.bytes} bytes "
                    f"(bounds {self.config.max_backlog_entries} / {self.config.max_backlog_bytes}) for {waited:.1f}s"
                )
            if not logged:
                log.info("backpressure_engaged", stream=self.stream, entries=backlog.entries, bytes=backlog.bytes)
                logged = True
            if stop is None:
                await asyncio.sleep(self.config.backpressure_poll_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.backpressure_poll_s)
            self._checked_at = -1e9
