"""Admission by the staleness budget: a producer starts a new group only while the trainers can still use it.

    in_flight + queued <= (max_staleness + 1) * per_version * over_sampling
    per_version = max(rollout_batch_size, groups the trainers read per batch)

This is DESIGN.md's rule with the batch counted in groups read, not trained. A group started now is read
after everything ahead of it: the groups being generated (`in_flight`) and those waiting for the trainer
(`queued`). The trainers read `per_version` groups per weight version (a batch, plus the groups their filters
drop: with most groups all-correct that is several batches), so a group that starts with at most
(max_staleness + 1) versions' worth ahead of it is trained within `max_staleness` versions of the weights it
was sampled with, and not dropped as stale. `over_sampling` > 1 admits more than that.

Where the numbers come from, each read at most every `bus.backpressure_poll_s`:
- `rollout_batch_size`, `max_staleness`, `read_per_batch` (recent average) and `held` (groups trained but not
  yet committed) from the trainers' heartbeats; with no trainer alive, or `max_staleness` = -1, there is no
  budget (backpressure still bounds the stream);
- `queued` = the "trainer" group's unacknowledged entries on `{ns}:trajectories` less the trainers' `held`,
  plus the partial rollouts waiting on `{ns}:partials` (not yet delivered to a producer);
- `in_flight` = this producer's own count, live, plus every other producer's `in_flight` from its heartbeat.

Heartbeats are `bus.heartbeat_interval_s` old at most, so producers that start together can overshoot by
what each admits in that time; on Redis 6.2, which reports no lag, the stream length stands in (an upper
bound: admission errs on the side of waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from miles_stream.bus import BusConfig, Keys, alive_members
from miles_stream.bus.backpressure import group_backlog
from miles_stream.bus.connection import is_transient

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Budget:
    """One reading of the staleness budget. `limit` None: no trainer sets one."""

    limit: int | None
    queued: int
    others_in_flight: int

    def room(self, own_in_flight: int) -> int | None:
        if self.limit is None:
            return None
        return self.limit - self.queued - self.others_in_flight - own_in_flight


class Admission:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, config: BusConfig, *, producer_id: str, over_sampling: float = 1.0
    ) -> None:
        self.redis, self.keys, self.config = redis, keys, config
        self.producer_id, self.over_sampling = producer_id, over_sampling
        self._budget = Budget(None, 0, 0)
        self._read_at = -math.inf
        self._queued_since_read = 0
        self.waits = 0  # times a start had to wait for room

    def note_queued(self) -> None:
        """Call when this producer puts a group in line (published, or recycled as a partial): it counts as
        queued at once, not only from the next reading, so a group that leaves `in_flight` is not counted out."""
        self._queued_since_read += 1

    async def budget(self) -> Budget:
        if time.monotonic() - self._read_at >= self.config.backpressure_poll_s:
            try:
                self._budget = await self._read()
                self._queued_since_read = 0
            except Exception as exc:  # Redis away: the last budget stands until the next poll (the claim that
                if not is_transient(exc):  # follows rides the outage out); this crashed a producer in CI
                    raise
                log.warning("admission_read_failed", error=str(exc))
            self._read_at = time.monotonic()
        return self._budget

    async def wait_for_room(self, own_in_flight: Callable[[], int], stop: asyncio.Event) -> bool:
        """Return True once one more group fits the budget, False if `stop` is set first."""
        logged = False
        while not stop.is_set():
            room = (await self.budget()).room(own_in_flight() + self._queued_since_read)
            if room is None or room >= 1:
                return True
            if not logged:
                self.waits += 1
                log.info("admission_waiting", budget=self._budget.limit, queued=self._budget.queued,
                         in_flight=self._budget.others_in_flight + own_in_flight())  # fmt: skip
                logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.backpressure_poll_s)
        return False

    async def _read(self) -> Budget:
        members = await alive_members(self.redis, self.keys, self.config.heartbeat_ttl_s)
        trainers = [m.info for m in members if m.role == "trainer"]
        others = sum(int(m.info.get("in_flight", 0)) for m in members if m.role == "producer"
                     and m.id != self.producer_id)  # fmt: skip
        bounded = [t for t in trainers if int(t.get("max_staleness", -1)) >= 0 and t.get("rollout_batch_size")]
        if not bounded:
            return Budget(None, 0, others)
        staleness = min(int(t["max_staleness"]) for t in bounded)
        batch = max(int(t["rollout_batch_size"]) for t in bounded)
        per_version = max(batch, sum(float(t.get("read_per_batch", 0.0)) for t in trainers))
        limit = math.floor((staleness + 1) * per_version * self.over_sampling)
        trajectories = await group_backlog(self.redis, self.keys.trajectories, "trainer")
        partials = await group_backlog(self.redis, self.keys.partials, "producers")
        held = sum(int(t.get("held", 0)) for t in trainers)
        queued = max(trajectories.unacked - held, 0) + partials.waiting
        return Budget(limit, queued, others)
