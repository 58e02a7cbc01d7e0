"""Typed publish/consume of `TrajectoryGroup`s, with dead letters for bad entries and dedup by group id.

Effectively-once: the stream delivers at least once (a retried XADD, a reclaimed entry), so the consumer
drops a group whose id it already holds or has committed. `commit()` records the group ids in the
`{ns}:done:{group}` set and acks their entries in one MULTI/EXEC, after the work that used them is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog

from miles_stream.bus.backpressure import Backpressure
from miles_stream.bus.blobs import BLOB, Blobs, blobs_for, payload
from miles_stream.bus.connection import RetryPolicy, is_transient
from miles_stream.bus.dataplane import StreamClient
from miles_stream.bus.done import DoneSet
from miles_stream.bus.keys import PRODUCER_GROUP, Keys
from miles_stream.bus.streams import DATA, BusConfig, Entry, StreamConsumer, publish
from miles_stream.codec import Frame, GroupCodec
from miles_stream.errors import SchemaError
from miles_stream.schema import TrajectoryGroup

log = structlog.get_logger(__name__)


class Ticket(Protocol):
    """What `commit` and `release` need of a group handed out: its entry and its id."""

    @property
    def entry_id(self) -> str: ...

    @property
    def group_id(self) -> str: ...

    @property
    def partition(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Claim:
    """A `Ticket` without the group's data, for holding groups across steps until they are committed."""

    entry_id: str
    group_id: str
    partition: int = 0  # which partition's trajectory stream the entry is on (bus.partitions)


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded group and the stream entry it came in."""

    entry_id: str
    group: TrajectoryGroup
    nbytes: int
    deliveries: int = 1
    partition: int = 0

    @property
    def group_id(self) -> str:
        return self.group.group_id

    @property
    def claim(self) -> Claim:
        return Claim(self.entry_id, self.group.group_id, self.partition)


@dataclass(slots=True)
class ConsumeCounters:
    received: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    committed: int = 0
    bytes: int = 0
    commits_lost: int = 0  # groups committed here, lost by Redis (a host crash), dropped again when they came back


class Fence(Protocol):
    """What fences a commit: the trainer's lease (`lease.Lease`) or its copy in a partition's slot
    (`lease.PartitionFence`). Runs `queue`'s commands in one MULTI/EXEC only while the lease is held."""

    async def fenced(self, queue: Callable[[Any], object]) -> list[Any]: ...


@dataclass(slots=True)
class GroupPublisher:
    """Encodes and XADDs groups to one stream; with `backpressure`, first waits while consumers lag."""

    client: StreamClient  # `dataplane.open_stream_client(...)`
    stream: str
    config: BusConfig
    codec: GroupCodec = field(default_factory=GroupCodec)
    backpressure: Backpressure | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    blobs: Blobs | None = None  # default: the store `config.blob_store` names (none if empty)

    def __post_init__(self) -> None:
        if self.blobs is None:
            self.blobs = blobs_for(self.config)

    async def publish(
        self,
        group: TrajectoryGroup,
        *,
        wait_s: float | None = None,
        still_owned: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[str, int] | None:
        """Publish `group` (waiting up to `wait_s` for room, forever if None); returns (entry id, bytes).

        `still_owned` (the producer: `StreamConsumer.confirm_owned` of the group's prompt entry) is asked after
        the wait for room, the last moment before the XADD: a wait, or a stall, may outlast the entry's claim;
        if it says no, nothing is published and this returns None.

        Transient failures (connection lost, Redis loading or out of memory) are retried by `retry`; an
        XADD retried after Redis applied it leaves a duplicate, which consumers drop by group id.
        """
        frame = self.codec.encode_frame(group)
        if (backpressure := self.backpressure) is not None:  # reads the backlog: retried like the XADD
            await self.retry.run(lambda: backpressure.wait_for_room(wait_s), on_retry=_log_retry)
        if still_owned is not None and not await self.retry.run(still_owned, on_retry=_log_retry):
            return None
        if self.blobs is not None and self.blobs.wants(frame.nbytes):
            entry_id, in_redis = await self._publish_blob(self.blobs, frame), 128
        else:
            entry_id, in_redis = await self.retry.run(
                lambda: publish(self.client, self.stream, frame, maxlen=self.config.maxlen_cap),
                on_retry=_log_retry,
            ), frame.nbytes  # fmt: skip
        if self.backpressure is not None:
            self.backpressure.record_sent(in_redis)
        return entry_id, frame.nbytes

    async def _publish_blob(self, blobs: Blobs, frame: Frame) -> str:
        """Put the frame in the blob store, then XADD an entry naming it (`bus/blobs.py`)."""
        name = await blobs.put(frame.parts)

        async def add() -> str:
            nonlocal name
            if not blobs.fresh(name):  # an outage outlasted half the sweep's margin: a new name, a new put
                name = await blobs.put(frame.parts)
            return await publish(self.client, self.stream, b"", maxlen=self.config.maxlen_cap, **{BLOB.decode(): name})

        return await self.retry.run(add, on_retry=_log_retry)


class GroupConsumer:
    """Reads `TrajectoryGroup`s for one consumer group, dead-lettering what fails to decode.

    With `owns_prompts` (the trainer), committing or releasing a group also deletes its prompt record from
    `{ns}:prompt_of`, which producers keep so that a stale group's prompt can be recycled.
    """

    def __init__(
        self,
        stream: StreamConsumer,
        keys: Keys,
        codec: GroupCodec | None = None,
        retry: RetryPolicy | None = None,
        *,
        owns_prompts: bool = False,
        partition: int = 0,
    ) -> None:
        self.stream = stream
        self.partition = partition  # which partition `keys` are (bus.partitions): carried by the groups read
        self.keys = keys
        self.codec = codec or GroupCodec()
        self.retry = retry or RetryPolicy()
        self.owns_prompts = owns_prompts
        self.fence: Fence | None = None  # with a lease, every commit applies only while it is held
        self.exhausted = False  # a stream never runs out (see RecordingSource)
        self.counters = ConsumeCounters()
        self._held: dict[str, str] = {}  # group id -> entry id, for groups handed out and not committed
        self._spares: dict[str, list[str]] = {}  # held group id -> later entries of it, pending until it is done
        self._recent: OrderedDict[str, float] = OrderedDict()  # group id -> when committed, the last commit_memory
        self.done = DoneSet(stream.redis, keys.done(stream.group), group=stream.group, stream=stream.stream,
                            sources=[(keys.prompts, PRODUCER_GROUP), (keys.partials, PRODUCER_GROUP)],
                            margin_ms=stream.config.claim_idle_ms)  # fmt: skip
        self._next_sweep = time.monotonic() + stream.config.done_sweep_s
        self.blobs = blobs_for(stream.config)
        # the other partitions' (client, trajectory stream): their entries name blobs in the same store, so a
        # blob sweep goes by the oldest entry of them all (bus/partitioned.py sets them)
        self.blob_peers: list[tuple[aioredis.Redis, str]] = []

    @property
    def done_key(self) -> str:
        return self.keys.done(self.stream.group)

    async def start(self) -> None:
        await self.stream.start()
        await self.retry.run(self.done.upgrade, on_retry=_log_retry)

    @property
    def keep_alive_interval_s(self) -> float:
        return self.stream.config.claim_idle_ms / 3000

    async def keep_alive(self) -> None:
        """Reset the idle time of the entries held, so that no other consumer takes them over."""
        await self.stream.touch_in_hand(force=True)

    async def read(self, count: int, block_ms: int | None = None) -> list[Received]:
        """Up to `count` new groups. Transient Redis failures are retried (a reply lost with the connection
        leaves its entries pending to this consumer; they come back through reclaim after claim_idle_ms)."""
        entries = await self.retry.run(lambda: self.stream.read(count, block_ms), on_retry=_log_retry)
        decoded: list[tuple[Entry, TrajectoryGroup]] = []
        sizes: dict[str, int] = {}
        for entry in entries:
            try:
                data = await payload(entry.fields, self.blobs)
                decoded.append((entry, self.codec.decode(data)))
                sizes[entry.id] = len(data)
            except SchemaError as exc:
                self.counters.dead_lettered += 1
                await self.retry.run(functools.partial(self.stream.dead_letter, entry, f"schema: {exc}"),
                                     on_retry=_log_retry)  # fmt: skip
        if not decoded:
            return []
        ids = [g.group_id for _, g in decoded]  # every call on this path rides out a Redis blip, as the read does
        done = await self.retry.run(lambda: self.done.contains(ids), on_retry=_log_retry)
        out, duplicate_ids, done_ids, lost = [], [], [], []
        for (entry, group), already_done in zip(decoded, done, strict=True):
            if not already_done and group.group_id in self._recent:  # committed here, the commit lost by Redis
                lost.append(Claim(entry.id, group.group_id, self.partition))
                continue
            if self._held.get(group.group_id) == entry.id:  # ours, held, handed out again: not a duplicate
                continue
            if group.group_id in self._held and not already_done:  # kept pending: the held entry may vanish
                self._spares.setdefault(group.group_id, []).append(entry.id)
                self.counters.duplicates += 1
                continue
            if already_done:
                duplicate_ids.append(entry.id)
                done_ids.append(group.group_id)
                continue
            self._held[group.group_id] = entry.id
            out.append(Received(entry.id, group, sizes[entry.id], entry.deliveries, self.partition))
        if duplicate_ids:
            self.counters.duplicates += len(duplicate_ids)
            await self.retry.run(lambda: self._drop_duplicates(duplicate_ids, done_ids), on_retry=_log_retry)
            log.info("duplicates_dropped", stream=self.stream.stream, count=len(duplicate_ids))
        if lost:  # trained once already: commit again (done set and ack), do not hand out
            self.counters.commits_lost += len(lost)
            self.counters.duplicates += len(lost)
            await self._finish(lost, done=True)
            log.warning("commits_lost_by_redis_recommitted", stream=self.stream.stream, count=len(lost),
                        total=self.counters.commits_lost)  # fmt: skip
        self.counters.received += len(out)
        self.counters.bytes += sum(r.nbytes for r in out)
        return out

    async def _drop_duplicates(self, entry_ids: list[str], done_group_ids: list[str]) -> None:
        """Ack duplicate entries; a duplicate of a group already trained also had its prompt record written
        again by the producer that re-made it (a reclaimed prompt), which only its trainer can delete."""
        if self.owns_prompts and done_group_ids:  # safe at any time, by anyone: the group is done for good
            await self.redis.hdel(self.keys.prompt_of, *done_group_ids)
        await self.stream.ack(entry_ids)

    async def still_held(self, items: Sequence[Received]) -> list[Received]:
        """The items this consumer still owns. Call before using a batch: an entry held past
        `claim_idle_ms` (a stalled process) may have been taken over, and its new owner will train it.
        Retried through a Redis outage like a read (it crashed a trainer whose Redis stopped at that moment)."""
        await self.retry.run(lambda: self.stream.touch_in_hand(force=True), on_retry=_log_retry)
        lost = self.stream.lost
        if not lost:
            return list(items)
        kept = []
        for r in items:
            if r.entry_id not in lost:
                kept.append(r)
                continue
            lost.discard(r.entry_id)
            spare = await self.retry.run(functools.partial(self._take_spare, r), on_retry=_log_retry)
            if spare is None:
                self._held.pop(r.group_id, None)
            else:
                kept.append(dataclasses.replace(r, entry_id=spare))
        return kept

    async def _take_spare(self, item: Received) -> str | None:
        """A held group's entry is no longer pending to this consumer. If another consumer holds it (taken
        over) or committed the group, that consumer trains it: drop ours, ack our later copies. If no one holds
        it and the group is not done, Redis lost the entry (a host crash rolled the stream back): a later copy
        of the group, kept pending for this case, takes its place (acked as a duplicate, the group was never
        trained: found stalled a run at 99 of 100 groups)."""
        spares = self._spares.pop(item.group_id, [])
        for entry_id in spares:
            self.stream.lost.discard(entry_id)
        mine = [e for e in spares if e in self.stream.in_hand]
        if not mine:
            return None
        rows: Any = await self.redis.xpending_range(
            self.stream.stream, self.stream.group, min=item.entry_id, max=item.entry_id, count=1
        )
        if rows or (await self.done.contains([item.group_id]))[0]:  # XPENDING first: commits are atomic
            await self.stream.ack(mine)
            return None
        self._held[item.group_id] = mine[0]
        if mine[1:]:
            self._spares[item.group_id] = mine[1:]
        log.warning("held_entry_vanished_copy_used", stream=self.stream.stream, group=item.group_id,
                    lost=item.entry_id, used=mine[0])  # fmt: skip
        return mine[0]

    def remember(self, group_ids: Sequence[str]) -> None:
        """Take `group_ids` as committed by this consumer (a checkpoint's recent commits after a restart): one
        that comes back while Redis's done set lacks it is committed again instead of handed out."""
        now = time.monotonic()
        for group_id in group_ids:
            self._recent[group_id] = now
            self._recent.move_to_end(group_id)
        while len(self._recent) > self.stream.config.commit_memory:
            self._recent.popitem(last=False)

    def recent_commits(self) -> list[str]:
        """The group ids committed in the last `bus.durable_after_s`: what a host crash may still take back."""
        since = time.monotonic() - self.stream.config.durable_after_s
        out = []
        for group_id in reversed(self._recent):  # newest first; stop at the first one old enough
            if self._recent[group_id] < since:
                break
            out.append(group_id)
        return out

    async def commit(self, items: Sequence[Ticket]) -> None:
        """Mark the groups done and ack their entries, atomically."""
        await self._finish(items, done=True)
        self.counters.committed += len(items)

    async def release(self, items: Sequence[Ticket], reason: str) -> None:
        """Ack entries whose groups were dropped on purpose (stale, filtered), without marking them done."""
        await self._finish(items, done=False)
        if items:
            log.info("groups_released", count=len(items), reason=reason)

    async def requeue_prompts(self, items: Sequence[Ticket]) -> int:
        """Put the prompts of these groups back on `{ns}:prompts` (for a fresh rollout) and release the groups;
        returns how many had a prompt record. A group without one (published by a replay) is just released."""
        if not items:
            return 0
        group_ids = [r.group_id for r in items]
        records: list[Any] = await self.redis.hmget(self.keys.prompt_of, group_ids)
        done = await self.done.contains(group_ids)  # done by another rank meanwhile: made again, it would be a copy
        found = [rec for rec, d in zip(records, done, strict=True) if rec is not None and not d]
        await self._finish(items, done=False, requeue=found)
        log.info("prompts_requeued", count=len(found), without_record=len(items) - len(found))
        return len(found)

    async def _finish(self, items: Sequence[Ticket], *, done: bool, requeue: Sequence[bytes] = ()) -> None:
        """Ack `items` in one transaction: marked done or not, their prompt records deleted (and `requeue`
        re-published to the prompt stream first)."""
        if not items:
            return
        group_ids = [r.group_id for r in items]
        ids = [r.entry_id for r in items] + [e for g in group_ids for e in self._spares.get(g, ())]

        def queue(pipe: Any, score: int) -> None:  # idempotent, except that a retry after an applied EXEC
            for record in requeue:  # re-adds `requeue` (its groups come back as duplicates)
                pipe.xadd(self.keys.prompts, {DATA: record})
            if done:
                self.done.queue_add(pipe, group_ids, score)
            if self.owns_prompts or requeue:
                pipe.hdel(self.keys.prompt_of, *group_ids)
            pipe.xack(self.stream.stream, self.stream.group, *ids)

        async def ack() -> None:
            score = await self.done.stamp() if done else 0
            if self.fence is not None:  # LeaseLostError: nothing applied, the entries stay for the new holder
                await self.fence.fenced(functools.partial(queue, score=score))
                return
            async with self.redis.pipeline(transaction=True) as pipe:
                queue(pipe, score)
                await pipe.execute()

        await self.retry.run(ack, on_retry=_log_retry)
        if done:
            self.remember(group_ids)
        for group_id in group_ids:
            self._held.pop(group_id, None)
            self._spares.pop(group_id, None)
        self.stream.in_hand.difference_update(ids)
        await self.stream.maybe_trim()
        await self._maybe_sweep()

    async def _maybe_sweep(self) -> None:
        """Bound the done set (`bus/done.py`), at most once per `bus.done_sweep_s`. Housekeeping, like a trim:
        a Redis blip is logged and the next call sweeps."""
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.stream.config.done_sweep_s
        try:
            await self.done.sweep()
            if self.blobs is not None:
                await self.blobs.maybe_sweep(self.redis, self.stream.stream, *self.blob_peers)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("done_sweep_failed", key=self.done.key, error=str(exc))

    @property
    def redis(self) -> aioredis.Redis:
        return self.stream.redis


def _log_retry(attempt: int, exc: BaseException) -> None:
    log.warning("redis_retry", attempt=attempt, error=str(exc))
