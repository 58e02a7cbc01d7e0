"""Admission by the staleness budget: a producer starts a group only if the trainers will read it while it
is still fresh.

A group started now, under the producer's weight version `v`, is read after everything ahead of it in line:
`ahead` = the groups being generated (every producer's `in_flight`), those waiting on the stream or read by a
trainer but not yet trained into a published version (`queued`), and partial rollouts waiting to be resumed.
The trainers read `per_version` groups per weight version, counted from their current version `V`, so this
group is read when the trainers are at version V + floor(ahead / per_version), and trained within
`max_staleness` = s versions of `v` exactly when

    ahead + 1 <= (s + 1 - (V - v)) * per_version        (times `over_sampling`, which admits more)
    per_version = publish_every * max(rollout_batch_size, groups the trainers read per batch)

The `V - v` term is what sync mode (s = 0) needs: while the trainer steps towards V + 1, or has published V + 1
that this producer has not loaded yet, nothing starts, so no group is generated only to be dropped as stale.
With s = k, groups are started so that they are trained within k versions.

Where the numbers come from, read at most every `bus.backpressure_poll_s`:
- `rollout_batch_size`, `max_staleness`, `publish_every`, `read_per_batch` (recent average), `version` (the
  trainer's, raised when it starts publishing) and `held` (groups trained into a published version but not yet
  committed) from the trainers' heartbeats, which a trainer refreshes at once when its version or held count
  changes; `V` is the larger of that and the newest announced version. With no trainer alive, or
  `max_staleness` = -1, there is no budget (backpressure still bounds the stream). The version and `held` are
  read after the backlog (`_read` says why);
- `queued` = the "trainer" group's unacknowledged entries on `{ns}:trajectories` (exact on every server:
  bus/backpressure.py) less the trainers' `held`, plus the partials not yet delivered to a producer;
- `in_flight` = this producer's own count, live, plus every other producer's from its heartbeat.

Each reading errs towards waiting where it can (a `held` read late counts groups as queued), except the
other producers' `in_flight`: producers that start together can overshoot by what each admits within a
heartbeat interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from miles_stream.bus import BusConfig, Keys, alive_members
from miles_stream.bus.backpressure import group_backlog
from miles_stream.bus.connection import is_transient
from miles_stream.bus.heartbeat import Member

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Budget:
    """One reading of the staleness budget. `staleness` None: no trainer sets one."""

    staleness: int | None
    per_version: float
    trainer_version: int
    queued: int
    others_in_flight: int
    over_sampling: float = 1.0

    def limit(self, own_version: int) -> int | None:
        """How many groups may be ahead in line, including one started now under `own_version`."""
        if self.staleness is None:
            return None
        versions = self.staleness + 1 - max(self.trainer_version - own_version, 0)
        return math.floor(versions * self.per_version * self.over_sampling)

    def room(self, own_in_flight: int, own_version: int) -> int | None:
        limit = self.limit(own_version)
        if limit is None:
            return None
        return limit - self.queued - self.others_in_flight - own_in_flight


class Admission:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        config: BusConfig,
        *,
        producer_id: str,
        own_version: Callable[[], int],
        over_sampling: float = 1.0,
        partitions: Sequence[tuple[aioredis.Redis, Keys]] = (),
    ) -> None:
        self.redis, self.keys, self.config = redis, keys, config
        self.partitions = list(partitions) or [(redis, keys)]  # whose streams' backlogs are summed (bus.partitions)
        self.producer_id, self.own_version, self.over_sampling = producer_id, own_version, over_sampling
        self._budget = Budget(None, 0.0, 0, 0, 0)
        self._read_at = -math.inf
        self._queued_since_read = 0
        self.waits = 0  # times a start had to wait for room
        self.waiting = False  # waiting for room now (heartbeats carry it to `status --watch`)

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
        try:
            while not stop.is_set():
                budget = await self.budget()
                room = budget.room(own_in_flight() + self._queued_since_read, self.own_version())
                if room is None or room >= 1:
                    return True
                self.waiting = True
                if not logged:
                    self.waits += 1
                    log.info("admission_waiting", limit=budget.limit(self.own_version()), queued=budget.queued,
                             in_flight=budget.others_in_flight + own_in_flight(), version=self.own_version(),
                             trainer_version=budget.trainer_version)  # fmt: skip
                    logged = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.backpressure_poll_s)
            return False
        finally:
            self.waiting = False

    async def _read(self) -> Budget:
        """The trainers' bounds from their heartbeats, then the backlog, then their version and held count
        again: a trainer makes a new version visible before it commits the groups it trained, so a reading
        that sees the commit also sees the version (read in the other order, a sync-mode producer could start
        groups under a version the trainer had just left)."""
        members = await alive_members(self.redis, self.keys, self.config.heartbeat_ttl_s)
        bounded = [m.info for m in members if m.role == "trainer" and int(m.info.get("max_staleness", -1)) >= 0
                   and m.info.get("rollout_batch_size")]  # fmt: skip
        if not bounded:
            return Budget(None, 0.0, 0, 0, self._others_in_flight(members))
        staleness = min(int(t["max_staleness"]) for t in bounded)
        batch = max(int(t["rollout_batch_size"]) for t in bounded)
        every = max(int(t.get("publish_every", 1)) for t in bounded)
        per_version = every * max(batch, sum(float(m.info.get("read_per_batch", 0.0)) for m in members
                                             if m.role == "trainer"))  # fmt: skip
        cap = math.floor((staleness + 1) * per_version * self.over_sampling) + 1  # all the count can matter to
        unacked = undelivered = 0
        for client, k in self.partitions:
            unacked += (await group_backlog(client, k.trajectories, "trainer", cap)).unacked
            undelivered += (await group_backlog(client, k.partials, "producers", cap)).undelivered
        after = await alive_members(self.redis, self.keys, self.config.heartbeat_ttl_s)
        trainers = [m.info for m in after if m.role == "trainer"]
        announced: list[tuple[bytes, float]] = await self.redis.zrevrange(  # type: ignore[assignment]
            f"{self.keys.weights}:versions", 0, 0, withscores=True
        )
        version = max([int(t.get("version", 0)) for t in trainers] + [int(score) for _, score in announced])
        held = sum(int(t.get("held", 0)) for t in trainers)
        queued = max(unacked - held, 0) + undelivered
        return Budget(staleness, per_version, version, queued, self._others_in_flight(after), self.over_sampling)

    def _others_in_flight(self, members: list[Member]) -> int:
        return sum(int(m.info.get("in_flight", 0)) for m in members if m.role == "producer"
                   and m.id != self.producer_id)  # fmt: skip
