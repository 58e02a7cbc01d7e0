"""The done set of a consumer group: the trajectory groups it committed, kept bounded over a long run.

A group's id must stay in the set for as long as a copy of the group can still reach the consumer group (a
retried XADD, a prompt reclaimed from a stalled producer and made again, a hand-back racing a publication).
Kept for ever, the set gained a member per group trained: 600 million a week at 1,000 groups/s.

Where copies come from. Every copy of group G is made from an entry that carries G's prompt, on `{ns}:prompts`
or `{ns}:partials`, while the "producers" group has not acked it: a producer publishes, then acks. A new such
entry (a hand-back, a recycled partial) is only ever written while G is not done: producers check the done set
in the same transaction (`hand_back`). So every entry that can make a copy of G was written before G's commit.

    score(G) = Redis's clock at the commit + `margin_ms`     (a ZSET member; re-commits keep the later score;
                                                             the clock: `server_ms`)

The sweep, two phases apart (each call advances at most one phase, every `bus.done_sweep_s`):

    1. horizon = the oldest entry not yet acked on prompts and partials (or the clock, if none);
       until   = the newest entry on the trajectory stream, read after the horizon
       -> every G scored below the horizon: all its prompt entries acked, so no copy is made any more, and
          every copy ever made is on the trajectory stream at or before `until`
    2. once this consumer group has acked everything up to `until`: forget the members scored below the horizon

Bounded: the set holds the groups committed since about the oldest unacked prompt, plus one sweep interval.
A prompt held for an hour (a long agentic rollout) holds an hour of commits. `count()` stays exact: the
forgotten are counted in the sweep hash, in the transaction that removes them.

What this does not cover: a trainer stalled longer than `margin_ms` between reading the clock and its commit
while a producer hands back a copy of the same group (the copy could then outlive the record); the margin is
`bus.claim_idle_ms`, past which the trainer's entries are taken over anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from miles_stream.bus.connection import read_watched
from miles_stream.bus.streams import as_str, no_such_key, parse_id

log = structlog.get_logger(__name__)

StreamId = tuple[int, int]
HORIZON, UNTIL, FORGOTTEN = "horizon", "until", "forgotten"
WATCH_TRIES = 8  # a sweep that keeps losing its WATCH to commits gives up until the next one


async def server_ms(redis: aioredis.Redis, clock: str) -> int:
    """Redis's clock, in ms: the id of an entry added to stream `clock` (kept at one entry). Not TIME: a user
    limited to data commands (docs/redis.md) may not run it, and a producer's clock is not Redis's."""
    entry_id: Any = await redis.xadd(clock, {"t": b""}, maxlen=1, approximate=False)
    return parse_id(entry_id)[0]


async def unacked_from(redis: aioredis.Redis, stream: str, group: str) -> StreamId | None:
    """The id of the oldest entry of `stream` that `group` has not acked (pending, or not yet delivered), or
    None if every entry is acked (or the stream does not exist). Without the group, every entry counts."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except rexc.ResponseError as exc:
        if no_such_key(exc):
            return None
        raise
    info = next((g for g in groups if as_str(g["name"]) == group), None)
    if info is not None and int(info["pending"]):
        oldest: Any = (await redis.xpending(stream, group))["min"]
        if oldest is not None:
            return parse_id(oldest)
    after = "-" if info is None else f"({as_str(info['last-delivered-id'])}"
    first: Any = await redis.xrange(stream, min=after, max="+", count=1)
    return parse_id(first[0][0]) if first else None


async def last_id(redis: aioredis.Redis, stream: str) -> StreamId:
    try:
        info: Any = await redis.xinfo_stream(stream)
    except rexc.ResponseError as exc:
        if no_such_key(exc):
            return (0, 0)
        raise
    return parse_id(info["last-generated-id"])


async def done_count(redis: aioredis.Redis, key: str) -> int:
    """Groups ever committed into done set `key` (those forgotten by its sweep included)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zcard(key)
        pipe.hget(f"{key}:sweep", FORGOTTEN)
        held, forgotten = await pipe.execute()
    return int(held) + int(forgotten or 0)


async def is_done(pipe: Any, key: str, group_id: str) -> bool:
    """Read after WATCH on `key` (a producer's hand-back): whether `group_id` is in done set `key`."""
    return await read_watched(pipe.zscore(key, group_id)) is not None


class DoneSet:
    """`{ns}:done:{group}` (ZSET group id -> score above) and its sweep state `{ns}:done:{group}:sweep`."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        *,
        group: str,
        stream: str,
        sources: Sequence[tuple[str, str]],
        margin_ms: int,
    ) -> None:
        self.redis, self.key, self.group, self.stream = redis, key, group, stream
        self.sources = tuple(sources)  # (stream, consumer group) pairs whose unacked entries can make copies
        self.margin_ms = margin_ms
        self.sweep_key = f"{key}:sweep"
        self.clock = f"{key}:clock"

    async def upgrade(self) -> None:
        """A done set written by an earlier build (a plain SET) becomes the sorted set, its members scored now:
        a run resumed across the upgrade keeps its dedup. Resumable (the SET is renamed first, then copied)."""
        old = f"{self.key}:set"
        if as_str(await self.redis.type(self.key)) == "set":
            try:
                await self.redis.rename(self.key, old)
            except rexc.ResponseError as exc:  # another rank renamed it first
                if not no_such_key(exc):
                    raise
        if as_str(await self.redis.type(old)) != "set":
            return
        score, cursor, moved = await self.stamp(), 0, 0
        while True:
            cursor, found = await self.redis.sscan(old, cursor, count=10_000)
            members = [as_str(m) for m in found]
            if members:
                await self.redis.zadd(self.key, dict.fromkeys(members, score), gt=True)
                moved += len(members)
            if not cursor:
                break
        await self.redis.delete(old)
        log.info("done_set_upgraded", key=self.key, members=moved)

    async def contains(self, group_ids: Sequence[str]) -> list[bool]:
        scores: Any = await self.redis.zmscore(self.key, list(group_ids))
        return [s is not None for s in scores]

    async def stamp(self) -> int:
        """The score for groups committed now (read just before the commit's transaction)."""
        return await server_ms(self.redis, self.clock) + self.margin_ms

    def queue_add(self, pipe: Any, group_ids: Iterable[str], score: int) -> None:
        pipe.zadd(self.key, dict.fromkeys(group_ids, score), gt=True)

    async def count(self) -> int:
        return await done_count(self.redis, self.key)

    async def sweep(self) -> int:
        """One phase of the sweep (module docstring); returns how many members it forgot."""
        state = {as_str(k): as_str(v) for k, v in (await self.redis.hgetall(self.sweep_key)).items()}
        if HORIZON not in state or UNTIL not in state:
            await self._mark()
            return 0
        behind = await unacked_from(self.redis, self.stream, self.group)
        if behind is not None and behind <= parse_id(state[UNTIL]):
            return 0  # copies may still be on their way to this group
        return await self._forget(int(state[HORIZON]))

    async def _mark(self) -> None:
        now = await server_ms(self.redis, self.clock)  # before the reads: what is written after them is newer
        heads = [await unacked_from(self.redis, stream, group) for stream, group in self.sources]
        horizon = min([now, *(ms for ms, _ in filter(None, heads))])
        until = await last_id(self.redis, self.stream)
        await self.redis.hset(self.sweep_key, mapping={HORIZON: horizon, UNTIL: f"{until[0]}-{until[1]}"})

    async def _forget(self, horizon: int) -> int:
        for _ in range(WATCH_TRIES):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await read_watched(pipe.watch(self.key, self.sweep_key))
                    n = int(await read_watched(pipe.zcount(self.key, "-inf", f"({horizon}")))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.zremrangebyscore(self.key, "-inf", f"({horizon}")
                    pipe.hincrby(self.sweep_key, FORGOTTEN, n)
                    pipe.hdel(self.sweep_key, HORIZON, UNTIL)
                    await pipe.execute()
                except rexc.WatchError:  # a commit landed meanwhile: count again
                    continue
            if n:
                log.info("done_set_swept", key=self.key, forgotten=n)
            return n
        return 0
