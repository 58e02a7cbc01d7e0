"""The replay buffer: reads groups through the "trainer" consumer group and forms batches.

    {ns}:trajectories ──GroupConsumer.read──► filters ──► ready (at most `capacity`) ──► next_batch(version)
                            │ duplicates: acked, dropped     │ stale at batch time: dropped or recycled
                            ▼                                ▼
                     {ns}:dead (undecodable)        {ns}:prompts (recycled prompt, from {ns}:prompt_of)

`next_batch` waits until `share` fresh groups are ready (this rank's part of `rollout_batch_size`); it
reads only while fewer than `capacity` groups are held, so a trainer that falls behind leaves the stream to
lag and the producers' backpressure stops them. Staleness is checked where the batch is formed, against the
version the trainer holds then: a group whose oldest token is more than `max_staleness` versions old is
counted and set aside, never trained. Groups handed out stay pending in Redis until the caller commits them
(`commit`), after the optimizer step that used them is saved.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from miles_stream.buffer.config import BufferConfig
from miles_stream.buffer.filters import FILTERS, DynamicFilter
from miles_stream.bus import Received, Ticket
from miles_stream.errors import ConfigError

log = structlog.get_logger(__name__)
WAIT_NOTE_S = 10.0  # how often a trainer starved of data says so


class GroupSource(Protocol):
    """Where groups come from: a consumer group on the stream (`bus.GroupConsumer`) or a recording."""

    exhausted: bool  # no group will ever come again (a recording read to its end)

    @property
    def keep_alive_interval_s(self) -> float: ...

    async def start(self) -> None: ...

    async def read(self, count: int) -> list[Received]: ...

    async def still_held(self, items: Sequence[Received]) -> list[Received]: ...

    async def commit(self, items: Sequence[Ticket]) -> None: ...

    async def release(self, items: Sequence[Ticket], reason: str) -> None: ...

    async def requeue_prompts(self, items: Sequence[Ticket]) -> int: ...

    async def keep_alive(self) -> None: ...

    def remember(self, group_ids: Sequence[str]) -> None:
        """Take these groups as committed already (a checkpoint's recent commits, after a restart)."""
        ...

    def recent_commits(self) -> list[str]:
        """Group ids committed so recently that a Redis host crash may still take the commit back."""
        ...


@dataclass(slots=True)
class BufferCounters:
    accepted: int = 0  # handed out in a batch
    stale_dropped: int = 0
    recycled: int = 0  # stale, and its prompt re-queued
    recycle_missing: int = 0  # stale, to recycle, but no prompt record was kept (e.g. a replayed recording)
    filtered: dict[str, int] = field(default_factory=dict)  # filter name -> groups dropped
    received: int = 0  # groups read, whatever became of them
    samples: int = 0  # their samples, and of those:
    reward_sum: float = 0.0
    correct: int = 0  # samples with reward >= 1 (exactly right, for the built-in rewards)
    response_tokens: int = 0  # their samples' response tokens
    stale_tokens: int = 0  # response tokens of the groups set aside as stale (generated, never trained)
    filtered_tokens: int = 0  # response tokens of the groups a filter dropped
    read_per_batch: float = 0.0  # groups a batch used up (trained or filtered; not stale), recent average
    staleness: dict[int, int] = field(default_factory=dict)  # versions behind -> groups handed out that stale

    @property
    def stale(self) -> int:
        return self.stale_dropped + self.recycled + self.recycle_missing


@dataclass(frozen=True, slots=True)
class Batch:
    items: list[Received]
    staleness: list[int]  # per group: trainer version - the group's oldest token version
    wait_s: float  # time spent waiting for data


class ReplayBuffer:
    def __init__(
        self,
        consumer: GroupSource,
        config: BufferConfig,
        *,
        share: int | None = None,
        filters: Mapping[str, DynamicFilter] | None = None,
    ) -> None:
        self.consumer, self.config = consumer, config
        self.share = share or config.rollout_batch_size
        if config.capacity < self.share:
            raise ConfigError(f"buffer.capacity={config.capacity} is below the {self.share} groups a batch needs here")
        self.filters = {name: FILTERS[name] for name in config.filters} if filters is None else dict(filters)
        self.counters = BufferCounters()
        self._ready: deque[Received] = deque()
        self._used_at_last_batch = 0

    async def start(self) -> None:
        await self.consumer.start()

    def __len__(self) -> int:
        return len(self._ready)

    async def next_batch(self, version: int, stop: asyncio.Event | None = None) -> Batch | None:
        """The next `share` groups that are fresh at `version`; None if `stop` is set first, or if the source
        is exhausted before there are enough."""
        started = time.monotonic()
        next_note = started + WAIT_NOTE_S
        while True:
            await self._set_aside_stale(version)
            if len(self._ready) >= self.share:
                items = [self._ready.popleft() for _ in range(self.share)]
                kept = await self.consumer.still_held(items)
                if len(kept) == len(items):
                    self._note_batch()
                    self.counters.accepted += len(kept)
                    staleness = [version - r.group.oldest_version for r in kept]
                    for s in staleness:
                        self.counters.staleness[s] = self.counters.staleness.get(s, 0) + 1
                    return Batch(kept, staleness, time.monotonic() - started)
                self._ready.extendleft(reversed(kept))  # some were taken over by another trainer: refill
                continue
            if (stop is not None and stop.is_set()) or self.consumer.exhausted:
                return None
            room = self.config.capacity - len(self._ready)
            received = await self.consumer.read(min(self.config.read_count, room))
            await self._admit(received)
            if not received and time.monotonic() >= next_note:
                next_note = time.monotonic() + WAIT_NOTE_S
                log.info("waiting_for_groups", have=len(self._ready), need=self.share, version=version,
                         waited_s=round(time.monotonic() - started, 1))  # fmt: skip

    async def commit(self, items: Sequence[Ticket]) -> None:
        await self.consumer.commit(items)

    def _note_batch(self) -> None:
        """What a batch costs in groups, as an average over about the last ten batches: producers size their
        admission budget by it (rollout/admission.py), since filtered groups are used up too. Stale groups are
        not counted: they are what the budget exists to prevent, and counting them made it grow with every
        overshoot (more admitted, more stale: 8-11% of the demo's groups once its producer got faster)."""
        c = self.counters
        used = c.received - c.stale
        read, self._used_at_last_batch = used - self._used_at_last_batch, used
        c.read_per_batch = float(read) if not c.accepted else 0.9 * c.read_per_batch + 0.1 * read

    async def _admit(self, received: list[Received]) -> None:
        dropped: dict[str, list[Received]] = {}
        c = self.counters
        for r in received:
            rewards = r.group.rewards
            c.received += 1
            c.samples += len(rewards)
            c.response_tokens += sum(s.num_tokens for s in r.group.samples)
            c.reward_sum += sum(rewards)
            c.correct += sum(x >= 1.0 for x in rewards)
            reason = next(((name, why) for name, f in self.filters.items() if (why := f(r.group))), None)
            if reason is None:
                self._ready.append(r)
                continue
            name, why = reason
            dropped.setdefault(name, []).append(r)
            log.debug("group_filtered", group_id=r.group_id, filter=name, reason=why)
        for name, items in dropped.items():
            self.counters.filtered[name] = self.counters.filtered.get(name, 0) + len(items)
            self.counters.filtered_tokens += sum(s.num_tokens for r in items for s in r.group.samples)
            await self.consumer.release(items, reason=f"filter {name}")

    async def _set_aside_stale(self, version: int) -> None:
        stale = [r for r in self._ready if self.config.is_stale(r.group.oldest_version, version)]
        if not stale:
            return
        ids = {r.entry_id for r in stale}
        self._ready = deque(r for r in self._ready if r.entry_id not in ids)
        lags = [version - r.group.oldest_version for r in stale]
        self.counters.stale_tokens += sum(s.num_tokens for r in stale for s in r.group.samples)
        log.info("stale_groups", count=len(stale), max_lag=max(lags), bound=self.config.max_staleness,
                 action=self.config.stale)  # fmt: skip
        if self.config.stale == "recycle":
            requeued = await self.consumer.requeue_prompts(stale)
            self.counters.recycled += requeued
            self.counters.recycle_missing += len(stale) - requeued
        else:
            await self.consumer.release(stale, reason="stale")
            self.counters.stale_dropped += len(stale)
