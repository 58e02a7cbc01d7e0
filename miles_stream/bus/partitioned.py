"""A run's streams split into partitions (`bus.partitions`, key layout in `keys.py`): a control client per
partition, and the trainer's consumer over several partitions.

    partition 0: {ns.p0}:prompts {ns.p0}:partials {ns.p0}:trajectories {ns.p0}:done:trainer {ns.p0}:prompt_of ...
    partition 1: {ns.p1}:...                                         (each its own slot on a Redis Cluster)
    the run:     {ns}:weights {ns}:lease:trainer {ns}:members {ns}:run                    (the namespace's slot)

A group never leaves the partition its prompt was fed to: its prompt entry, the partial it is recycled into, the
trajectory entry its producer publishes, its prompt record, its done-set member and every hand-back stay there.
So each commit, hand-back and done-set sweep is the single-partition one, in one slot, and each partition's
exactly-once argument (`done.py`) holds on its own. A commit of groups from several partitions is one
transaction per partition (`PartitionedConsumer.commit`), each fenced by the lease's copy in that slot
(`lease.PartitionFence`); a trainer that dies between them leaves the rest pending, taken over and committed by
the next holder, as a commit that never ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

import redis.asyncio as aioredis

from miles_stream.bus.connection import RedisConfig, connect
from miles_stream.bus.groups import ConsumeCounters, GroupConsumer, Received, Ticket
from miles_stream.bus.keys import Keys

T = TypeVar("T", bound=Ticket)
# A trainer waits `block_ms / N` on one partition after reading each without waiting, so a group in another is
# read soon; but at least this long, so an idle trainer rank sends at most N + 1 reads every 0.1 s.
_MIN_WAIT_MS = 100


def partition_clients(config: RedisConfig, keys: Sequence[Keys], main: aioredis.Redis) -> list[aioredis.Redis]:
    """A control client for each partition: on a Redis Cluster, one pinned to the partition's slot; on one server
    (or with one partition, or without a slot to pin to: redis-py's cluster client routes by itself), `main`."""
    if len(keys) == 1 or not config.cluster or not config.slot_of:
        return [main] * len(keys)
    return [connect(replace(config, slot_of=k.namespace)) for k in keys]


async def close_partition_clients(clients: Sequence[aioredis.Redis], main: aioredis.Redis) -> None:
    """Close the clients `partition_clients` opened (not `main`)."""
    for client in {id(c): c for c in clients if c is not main}.values():
        await client.aclose()


class PartitionedConsumer:
    """The trainer's `GroupSource` over partitions: reads those in `reading` round-robin (first without
    waiting, then a blocking read on one, `block_ms / len(reading)` but at least 0.1 s), commits, releases and
    re-queues each group in its own partition (`Ticket.partition`), any of `parts` (a resumed rank 0 commits every
    rank's checkpointed claims)."""

    def __init__(self, parts: Sequence[GroupConsumer], reading: Sequence[int]) -> None:
        if not reading or any(not 0 <= p < len(parts) for p in reading):
            raise ValueError(f"partitions to read {list(reading)} must be among the {len(parts)} partitions")
        self.parts, self.reading = list(parts), list(reading)
        for part in self.parts:  # one blob store for every partition: each sweep looks at them all
            part.blob_peers = [(other.redis, other.stream.stream) for other in self.parts if other is not part]
        self.exhausted = False
        self._next = 0  # index into `reading` of the partition to read first

    @property
    def keep_alive_interval_s(self) -> float:
        return self.parts[0].keep_alive_interval_s

    @property
    def counters(self) -> ConsumeCounters:
        """The partitions' counters, summed."""
        total = ConsumeCounters()
        for part in self.parts:
            for f in dataclasses.fields(ConsumeCounters):
                setattr(total, f.name, getattr(total, f.name) + getattr(part.counters, f.name))
        return total

    async def start(self) -> None:
        for p in self.reading:
            await self.parts[p].start()

    async def read(self, count: int, block_ms: int | None = None) -> list[Received]:
        n = len(self.reading)
        for i in range(n):
            at = (self._next + i) % n
            got = await self.parts[self.reading[at]].read(count, block_ms=0)
            if got:
                self._next = (at + 1) % n
                return got
        at, self._next = self._next, (self._next + 1) % n
        part = self.parts[self.reading[at]]
        block = part.stream.config.block_ms if block_ms is None else block_ms
        return await part.read(count, block_ms=max(block // n, min(block, _MIN_WAIT_MS)) if block else 0)

    async def still_held(self, items: Sequence[Received]) -> list[Received]:
        kept: list[Received] = []
        for p, some in _by_partition(items).items():
            kept += await self.parts[p].still_held(some)
        return kept

    async def commit(self, items: Sequence[Ticket]) -> None:
        for p, some in _by_partition(items).items():
            await self.parts[p].commit(some)

    async def release(self, items: Sequence[Ticket], reason: str) -> None:
        for p, some in _by_partition(items).items():
            await self.parts[p].release(some, reason)

    async def requeue_prompts(self, items: Sequence[Ticket]) -> int:
        return sum([await self.parts[p].requeue_prompts(some) for p, some in _by_partition(items).items()])

    async def keep_alive(self) -> None:
        for p in self.reading:
            await self.parts[p].keep_alive()

    def remember(self, group_ids: Sequence[str]) -> None:
        """A checkpoint's commits name no partition: every partition remembers them (a returning copy can only
        come back in its own)."""
        for part in self.parts:
            part.remember(group_ids)

    def recent_commits(self) -> list[str]:
        return list(dict.fromkeys(g for part in self.parts for g in part.recent_commits()))


def _by_partition(items: Sequence[T]) -> dict[int, list[T]]:
    out: dict[int, list[T]] = {}
    for item in items:
        out.setdefault(item.partition, []).append(item)
    return out
