"""Backpressure: a producer waits while the consumers' backlog on a stream exceeds a bound.

The backlog of a consumer group is what it has not acknowledged: entries not yet delivered (lag) plus
entries delivered and pending. Redis 7 reports lag in XINFO GROUPS; where it does not (6.2, or 7.x after
deletions), the stream length stands in, an upper bound that stays close because consumers trim what every
group has acknowledged. Bytes are estimated from the sizes this producer has been sending.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from miles_stream.bus.streams import BusConfig, trim_acknowledged
from miles_stream.errors import BackpressureTimeout

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Backlog:
    entries: int
    bytes: int

    def exceeds(self, config: BusConfig) -> bool:
        return self.entries >= config.max_backlog_entries or self.bytes >= config.max_backlog_bytes


async def stream_backlog(redis: aioredis.Redis, stream: str) -> int:
    """Largest unacknowledged count over the stream's consumer groups (the stream length if none)."""
    return (await _backlog(redis, stream))[0]


@dataclass(frozen=True, slots=True)
class GroupBacklog:
    """What one consumer group has not acknowledged. `undelivered` is None where Redis cannot say (6.2)."""

    undelivered: int | None
    pending: int
    length: int  # of the stream: an upper bound on undelivered + pending

    @property
    def unacked(self) -> int:
        return self.length if self.undelivered is None else self.undelivered + self.pending

    @property
    def waiting(self) -> int:
        """Entries not yet delivered; where Redis cannot say, the length less what is pending."""
        return max(self.length - self.pending, 0) if self.undelivered is None else self.undelivered


async def _length_and_groups(redis: aioredis.Redis, stream: str) -> tuple[int, list[Any]]:
    """XLEN and XINFO GROUPS in one round trip; (0, []) while the stream does not exist."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        try:
            length, groups = await pipe.execute()
        except rexc.ResponseError as exc:  # no such key yet
            if "no such key" in str(exc).lower():
                return 0, []
            raise
    return int(length), list(groups)


async def group_backlog(redis: aioredis.Redis, stream: str, group: str) -> GroupBacklog:
    """The backlog of consumer group `group` on `stream` (the whole stream if that group does not exist)."""
    length, groups = await _length_and_groups(redis, stream)
    for g in groups:
        if g["name"] in (group, group.encode()):
            lag = g.get("lag")
            return GroupBacklog(None if lag is None else int(lag), int(g["pending"]), length)
    return GroupBacklog(length, 0, length)


async def _backlog(redis: aioredis.Redis, stream: str) -> tuple[int, bool]:
    """(backlog, exact): exact where every group reports its lag, else the stream length stands in."""
    length, groups = await _length_and_groups(redis, stream)
    if not groups:
        return length, length == 0  # no stream yet: exactly empty; a stream nobody reads: its length
    worst, exact = 0, True
    for g in groups:
        lag = g.get("lag")  # 7.x: undelivered entries; pending ones come on top
        exact = exact and lag is not None
        backlog = length if lag is None else int(lag) + int(g["pending"])  # the length holds both
        worst = max(worst, backlog)
    return worst, exact


class Backpressure:
    """Blocks a producer while the backlog on `stream` is at or over its bound. Polls at most every
    `backpressure_poll_s`, so a hundred producers cost Redis a hundred small reads per poll interval."""

    def __init__(self, redis: aioredis.Redis, stream: str, config: BusConfig) -> None:
        self.redis, self.stream, self.config = redis, stream, config
        self._avg_bytes = 0.0
        self._checked_at = -1e9
        self._last_entries = 0
        self._exact = True
        self._sent_since_check = 0

    def record_sent(self, nbytes: int) -> None:
        """Call after each publish: counts toward the backlog until the next check sees it in Redis."""
        self._avg_bytes = nbytes if not self._avg_bytes else 0.9 * self._avg_bytes + 0.1 * nbytes
        self._sent_since_check += 1

    async def backlog(self) -> Backlog:
        now = time.monotonic()
        if now - self._checked_at >= self.config.backpressure_poll_s:
            self._last_entries, self._exact = await _backlog(self.redis, self.stream)
            self._sent_since_check = 0
            self._checked_at = now
        entries = self._last_entries + self._sent_since_check
        return Backlog(entries, int(entries * self._avg_bytes))

    async def wait_for_room(self, timeout_s: float | None = None) -> None:
        start = time.monotonic()
        logged = False
        while (backlog := await self.backlog()).exceeds(self.config):
            waited = time.monotonic() - start
            if timeout_s is not None and waited >= timeout_s:
                raise BackpressureTimeout(
                    f"backlog on {self.stream} stayed at {backlog.entries} entries / {backlog.bytes} bytes "
                    f"(bounds {self.config.max_backlog_entries} / {self.config.max_backlog_bytes}) for {waited:.1f}s"
                )
            if not logged:
                log.info("backpressure_engaged", stream=self.stream, entries=backlog.entries, bytes=backlog.bytes)
                logged = True
            # Where Redis cannot report lag (6.2) the backlog is the stream length: trim what every group
            # has acknowledged, or a waiting producer and an idle consumer could wait on each other forever.
            if not self._exact:
                await trim_acknowledged(self.redis, self.stream)
            await asyncio.sleep(self.config.backpressure_poll_s)
            self._checked_at = -1e9
