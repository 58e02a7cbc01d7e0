"""Redis Streams with consumer groups: publish, read (own pending first), ack, reclaim, dead-letter.

Delivery is at least once. A consumer that dies leaves its entries pending; any other consumer of the same
group takes them over with XAUTOCLAIM once they have been idle `claim_idle_ms`. An entry delivered more
than `max_deliveries` times, or one whose payload is gone, is moved to `{ns}:dead` with a reason and acked.

Redis 6.2 and 7.x differ for entries deleted while pending: XAUTOCLAIM on 6.2 returns them as nil (id
unknown) and keeps them pending; 7.0 lists their ids separately and drops them. Both end here as a dead
letter with reason "deleted", and nothing stays pending.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from miles_stream.bus.connection import data_loss_error, is_transient, lost_data, read_watched
from miles_stream.bus.dataplane import StreamClient, ThreadedStreamClient
from miles_stream.bus.keys import names_a_partition, observers_of
from miles_stream.codec import Frame
from miles_stream.config import check

log = structlog.get_logger(__name__)
DATA = b"d"
VERSION = b"version"  # field of a weight announcement on {ns}:weights
# More partitions than a cluster has primaries gain nothing, and each costs every process reads (2N + 1 an idle
# producer's `block_ms`): 64 is past any cluster this bus needs (docs/scale.md)
MAX_PARTITIONS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class BusConfig:
    """Stream behaviour shared by every process of a run."""

    namespace: str = "miles"
    # The prompt, partial and trajectory streams (and what a commit touches with them) split this many ways,
    # each partition under a hash tag of its own: on a Redis Cluster, over as many slots (keys.py; docs/scale.md)
    partitions: int = 1
    maxlen_cap: int = 100_000  # memory safety cap on XADD (MAXLEN ~); trimming normally follows acks
    block_ms: int = 1000
    claim_idle_ms: int = 60_000  # also: an observer group (recorder) silent this long is dead, trimmed past
    claim_interval_s: float = 5.0
    max_deliveries: int = 5
    max_backlog_entries: int = 1024
    max_backlog_bytes: int = 4 << 30
    backpressure_poll_s: float = 0.2
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 10.0
    lease_ttl_s: float = 20.0  # a writer's lease (the trainer's) ends this long after its last renewal
    # A host crash takes the last ~1-2 s of writes with it (AOF everysec): commits among them come back as
    # entries to train. The trainer's consumer remembers its last `commit_memory` committed group ids and drops
    # such a group again (enough at 1,500 groups/s for the claim_idle_ms after a restart in which a rolled-back
    # pending entry returns; 100k ids are ~10 MB); its checkpoint names the ones committed in the last
    # `durable_after_s`, for a trainer that died with the host (docs/reliability.md).
    commit_memory: int = 100_000
    durable_after_s: float = 5.0
    done_sweep_s: float = 30.0  # how often a consumer group's done set forgets what no copy can reach (done.py)
    # Groups whose encoded frame reaches blob_threshold_bytes go to a blob store, the entry naming it (blobs.py):
    # "" (off), file:///shared/dir or s3://bucket/prefix[?endpoint=URL]. Every process of the run needs it set.
    blob_store: str = ""
    blob_threshold_bytes: int = 32 << 20
    blob_grace_s: float = 600.0  # a blob outlives the trim of entries put around its time by this much

    def __post_init__(self) -> None:
        check(bool(self.namespace) and ":" not in self.namespace, "bus.namespace", "must be non-empty, no ':'")
        check(not names_a_partition(self.namespace), "bus.namespace",
              f"{self.namespace!r} ends like another run's partition ('.p' and a number): rename it")  # fmt: skip
        check(1 <= self.partitions <= MAX_PARTITIONS, "bus.partitions",
              f"must be between 1 and {MAX_PARTITIONS} (1: one stream each; each process reads every partition "
              "it serves in turn, so an idle one polls 2N + 1 times a block_ms)")  # fmt: skip
        check(self.maxlen_cap >= 1000, "bus.maxlen_cap", "must be >= 1000: it is a safety cap, not a trimmer")
        check(self.block_ms >= 1, "bus.block_ms", "must be >= 1")
        check(self.claim_idle_ms >= 1, "bus.claim_idle_ms", "must be >= 1")
        check(self.max_deliveries >= 1, "bus.max_deliveries", "must be >= 1")
        check(self.max_backlog_entries >= 1, "bus.max_backlog_entries", "must be >= 1")
        check(self.max_backlog_bytes >= 1, "bus.max_backlog_bytes", "must be >= 1")
        check(self.lease_ttl_s >= 0.1, "bus.lease_ttl_s", "must be >= 0.1 s (renewed every quarter of it)")
        check(self.commit_memory >= 0, "bus.commit_memory", "must be >= 0 (0 = forget every commit)")
        check(self.durable_after_s >= 0, "bus.durable_after_s", "must be >= 0")
        check(self.done_sweep_s > 0, "bus.done_sweep_s", "must be > 0")
        check(self.blob_threshold_bytes >= 1, "bus.blob_threshold_bytes", "must be >= 1")
        check(self.blob_grace_s > 0, "bus.blob_grace_s", "must be > 0")
        check(
            self.heartbeat_ttl_s > self.heartbeat_interval_s > 0,
            "bus.heartbeat_ttl_s",
            "must exceed bus.heartbeat_interval_s, which must be positive",
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as delivered to this consumer. `deliveries` counts this delivery too."""

    id: str
    fields: Mapping[bytes, Any]  # values are bytes, or bytearray from the data-plane client
    deliveries: int = 1

    @property
    def data(self) -> bytes | bytearray:
        data: bytes | bytearray = self.fields.get(DATA, b"")
        return data


async def publish(client: StreamClient, stream: str, data: bytes | Frame, *, maxlen: int, **extra: str | bytes) -> str:
    """XADD one entry (`d` holds the payload) with an approximate MAXLEN safety cap; returns its id."""
    if isinstance(data, Frame) and not isinstance(client, ThreadedStreamClient):
        data = data.join()  # only the data-plane client sends a frame from its parts
    fields: dict[Any, Any] = {DATA: data, **extra}
    entry_id = await client.xadd(stream, fields, maxlen=maxlen, approximate=True)
    return as_str(entry_id)


async def ensure_group(redis: aioredis.Redis, stream: str, group: str, start_id: str = "0") -> None:
    """Create consumer group `group` on `stream` (and the stream) unless it exists."""
    try:
        await redis.xgroup_create(stream, group, id=start_id, mkstream=True)
    except rexc.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def reason_kind(reason: str) -> str:
    """A dead letter's reason, short enough for a metric label: "schema: bad frame" -> "schema", "delivered 6
    times (...)" -> "delivered", "deleted from the stream while pending" -> "deleted"."""
    return reason.split(":", 1)[0].split(" ", 1)[0][:32] or "unknown"


async def dead_letter(
    redis: aioredis.Redis, dead_stream: str, *, source: str, group: str, entry: Entry, reason: str, maxlen: int
) -> None:
    """Copy `entry` to the dead-letter stream with why it failed, then ack it in one transaction."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(
            dead_stream,
            {
                DATA: bytes(entry.data),
                b"reason": reason.encode()[:4096],
                b"source": source.encode(),
                b"source_id": entry.id.encode(),
                b"group": group.encode(),
                b"deliveries": str(entry.deliveries).encode(),
                b"at": repr(time.time()).encode(),
            },
            maxlen=maxlen,
            approximate=True,
        )
        pipe.xack(source, group, entry.id)
        await pipe.execute()
    log.warning("dead_lettered", stream=source, group=group, id=entry.id, reason=reason)


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    ms, _, seq = as_str(entry_id).partition("-")
    return int(ms), int(seq or 0)


async def trim_acknowledged(redis: aioredis.Redis, stream: str, *, observer_dead_ms: int | None = None) -> int:
    """XTRIM MINID below the oldest entry some consumer group still needs; returns entries removed.

    An entry is needed while it is pending in a group or not yet delivered to it. A stream with no group
    is left alone: nobody has said what they have read.

    Observer groups (`keys.observers_of`: the recorder) hold the stream like the others while alive. With
    `observer_dead_ms`, one none of whose consumers has touched Redis for that long (it died, its disk
    filled) is trimmed past: a dead observer must not keep every entry until Redis runs out of memory. What
    it had not read is then lost to it; the entries removed are counted in the observers hash, and the
    observer reports the count when it comes back (`StreamConsumer.trimmed_unread`). A live observer that
    lags holds the stream until the XADD cap (`bus.maxlen_cap`) cuts its oldest entries, uncounted (Redis
    does not say what MAXLEN removed). Without any group but dead observers the stream is left alone: the
    run's consumer has not started and will want it all.
    """
    groups = await redis.xinfo_groups(stream)
    if not groups:
        return 0
    observers = {as_str(o) for o in await redis.hkeys(observers_of(stream))} if observer_dead_ms is not None else set()
    holds: list[tuple[int, int]] = []
    dead: list[tuple[tuple[int, int], str]] = []  # (need, group) of dead observers
    for g in groups:
        name = as_str(g["name"])
        oldest_pending = (await redis.xpending(stream, name))["min"] if int(g["pending"]) else None
        if oldest_pending is not None:
            need = parse_id(oldest_pending)
        else:  # nothing pending (or acked since XINFO): all up to last-delivered-id is acknowledged
            ms, seq = parse_id(g["last-delivered-id"])
            need = (ms, seq + 1)
        if name in observers and observer_dead_ms is not None and await _dead(redis, stream, name, observer_dead_ms):
            dead.append((need, name))
        else:
            holds.append(need)
    if not holds:
        return 0
    floor = min(holds)
    behind = sorted(d for d in dead if d[0] < floor)
    if not behind:
        return await _trim_below(redis, stream, floor)
    # Lowest need first: what the step from one dead observer's need to the next removes, every dead observer
    # at or below that step had not read. The first step removes what all of them had acknowledged.
    removed = await _trim_below(redis, stream, behind[0][0])
    lost: dict[str, int] = {}
    for i in range(len(behind)):
        step = await _trim_below(redis, stream, behind[i + 1][0] if i + 1 < len(behind) else floor)
        removed += step
        for _, earlier in behind[: i + 1]:
            lost[earlier] = lost.get(earlier, 0) + step
    async with redis.pipeline(transaction=False) as pipe:
        for name, n in lost.items():
            if n:
                pipe.hincrby(observers_of(stream), name, n)
        await pipe.execute()
    if any(lost.values()):
        log.warning("trimmed_past_dead_observers", stream=stream, lost={k: v for k, v in lost.items() if v})
    return removed


async def _trim_below(redis: aioredis.Redis, stream: str, need: tuple[int, int]) -> int:
    return int(await redis.xtrim(stream, minid=f"{need[0]}-{need[1]}", approximate=False))


async def _dead(redis: aioredis.Redis, stream: str, group: str, dead_ms: int) -> bool:
    """No consumer of `group` has read, claimed or acked for `dead_ms` (or it has none)."""
    consumers: Any = await redis.xinfo_consumers(stream, group)
    return all(int(c["idle"]) >= dead_ms for c in consumers)


class StreamConsumer:
    """One named consumer of a consumer group on one stream.

    `read()` returns entries: first this consumer's own pending ones (left by an earlier run under the same
    name), then idle entries reclaimed from dead consumers (checked every `claim_interval_s`), then new ones,
    waiting up to `block_ms`. Entries stay pending until `ack()`; the caller decides when that is safe.
    `blocking` must be a client of its own (`dataplane.open_stream_client(block_ms=...)`): it carries the
    blocking XREADGROUP and, with it, the bulk of the bytes.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        blocking: StreamClient,
        *,
        stream: str,
        group: str,
        consumer: str,
        dead_stream: str,
        config: BusConfig,
        observer: bool = False,
    ) -> None:
        self.redis, self.blocking = redis, blocking
        self.stream, self.group, self.consumer = stream, group, consumer
        self.dead_stream, self.config = dead_stream, config
        self.observer = observer  # watches the run (the recorder): never holds it back (`trim_acknowledged`)
        self.trimmed_unread = 0  # an observer's entries trimmed before it read them (it was dead), reported
        self.dead_letters: dict[str, int] = {}  # reason kind (`reason_kind`) -> entries this consumer dead-lettered
        self._pending_cursor: str | None = "0"  # None once our own backlog has been re-read
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_touch = 0.0
        self._next_trim = 0.0
        self.in_hand: set[str] = set()  # delivered to the caller, not acked yet
        self.lost: set[str] = set()  # held too long: another consumer reclaimed them; do not commit these

    async def start(self) -> None:
        await ensure_group(self.redis, self.stream, self.group)
        if self.observer:
            await self.redis.hsetnx(observers_of(self.stream), self.group, 0)

    async def read(self, count: int, block_ms: int | None = None) -> list[Entry]:
        await self.touch_in_hand()
        await self.maybe_trim()
        if self.observer:
            await self._report_trimmed()
        if self._pending_cursor is not None:
            entries = await self._read_own_pending(count)
            if entries:
                return entries
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.config.claim_interval_s
            entries = await self.claim_idle(count)
            if entries:
                return entries
        block = self.config.block_ms if block_ms is None else block_ms
        reply: Any = await self.blocking.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block or None
        )
        return self._hand_out(Entry(as_str(i), f) for _, items in reply or [] for i, f in items)

    async def ack(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        n = int(await self.redis.xack(self.stream, self.group, *ids))
        self.in_hand.difference_update(ids)
        await self.maybe_trim()
        return n

    async def maybe_trim(self) -> None:
        """Trim what every group has acknowledged, at most once per `claim_interval_s`. Housekeeping: a Redis
        blip is logged and the next call trims (it failed commits whose acks had gone through)."""
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + self.config.claim_interval_s
            try:
                await trim_acknowledged(self.redis, self.stream, observer_dead_ms=self.config.claim_idle_ms)
            except Exception as exc:
                if lost_data(exc) or no_such_key(exc):  # the stream just read from is gone: Redis lost it
                    raise data_loss_error(exc) from exc
                if not is_transient(exc):
                    raise
                log.warning("trim_failed", stream=self.stream, error=str(exc))

    async def _report_trimmed(self) -> None:
        """Log (and count) the entries trimmed before this observer read them: it was dead a while."""
        async with self.redis.pipeline(transaction=True) as pipe:  # read and reset, so each is told once
            pipe.hget(observers_of(self.stream), self.group)
            pipe.hset(observers_of(self.stream), self.group, 0)
            lost, _ = await pipe.execute()
        if lost is not None and int(lost) > 0:
            self.trimmed_unread += int(lost)
            log.error("entries_trimmed_unread", stream=self.stream, group=self.group, count=int(lost),
                      total=self.trimmed_unread)  # fmt: skip

    async def dead_letter(self, entry: Entry, reason: str) -> None:
        await dead_letter(
            self.redis,
            self.dead_stream,
            source=self.stream,
            group=self.group,
            entry=entry,
            reason=reason,
            maxlen=self.config.maxlen_cap,
        )
        self.in_hand.discard(entry.id)
        kind = reason_kind(reason)
        self.dead_letters[kind] = self.dead_letters.get(kind, 0) + 1

    async def touch_in_hand(self, force: bool = False) -> None:
        """Reset the idle time of entries held but not acked, so no other consumer reclaims them.

        Touched every claim_idle/3, an entry held is never idle for claim_idle. If this consumer stalled
        longer than that and another took an entry over, the entry moves from `in_hand` to `lost` (it is
        not taken back: XCLAIM's min-idle skips an entry just claimed) and the caller must drop it.
        """
        now = time.monotonic()
        if not self.in_hand or (now < self._next_touch and not force):
            return
        self._next_touch = now + self.config.claim_idle_ms / 3000
        rows = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=len(self.in_hand) + 1024, consumername=self.consumer
        )
        owned = {as_str(r["message_id"]) for r in rows} & self.in_hand
        if lost := self.in_hand - owned:
            self.in_hand -= lost
            self.lost |= lost
            log.warning("entries_lost_to_reclaim", stream=self.stream, group=self.group, count=len(lost))
        if owned:
            ids: list[Any] = sorted(owned)
            min_idle = self.config.claim_idle_ms // 4
            await self.redis.xclaim(self.stream, self.group, self.consumer, min_idle, ids, justid=True)

    async def confirm_owned(self, entry_id: str) -> bool:
        """Whether this consumer still owns `entry_id`, and if so its idle time reset, in one atomic step.

        Call just before making the entry's work visible (the producer: before XADDing a group). A process
        frozen past `claim_idle_ms` (SIGSTOP, swap) may have had the entry taken over while keep-alive could not
        run; `touch_in_hand` sees that only at its next tick, which may come after the publication. Resetting
        the idle time here gives the caller a fresh `claim_idle_ms` to publish in; a stall longer than that
        between this call and the publication still yields a duplicate, which consumers drop by group id.
        An entry found taken over leaves `in_hand` (and `lost`): the caller drops its work.
        """
        owned = await self._confirm_owned(entry_id)
        if not owned:
            self.in_hand.discard(entry_id)
            self.lost.discard(entry_id)
            log.warning("entry_taken_over", stream=self.stream, group=self.group, id=entry_id)
        return bool(owned)

    async def _confirm_owned(self, entry_id: str) -> bool:
        """WATCH the stream, read the entry's owner, and if it is this consumer XCLAIM it (idle reset, delivery
        count unchanged) in a MULTI that applies only if nothing changed the stream meanwhile. WATCH/MULTI
        rather than a script, so a namespace-limited ACL user without @scripting can run it (as the lease)."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                await read_watched(pipe.watch(self.stream))
                rows: Any = await read_watched(
                    pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
                )
                if not rows or as_str(rows[0]["consumer"]) != self.consumer:
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.xclaim(self.stream, self.group, self.consumer, 0, [entry_id], justid=True)
                try:
                    await pipe.execute()
                    return True
                except rexc.WatchError:  # the stream changed between the read and the claim: look again
                    continue

    async def claim_idle(self, count: int) -> list[Entry]:
        """Take over entries idle longer than `claim_idle_ms` from any consumer of the group."""
        reply = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, self.config.claim_idle_ms, self._claim_cursor, count=count
        )
        self._claim_cursor = as_str(reply[0])
        live = [Entry(as_str(i), f) for i, f in reply[1] if i is not None and as_str(i) not in self.in_hand]
        lost_ids = [as_str(i) for i in reply[2]] if len(reply) > 2 else []  # Redis 7: deleted, already dropped
        if any(i is None for i, _ in reply[1]):  # Redis 6.2: deleted entries come back as nil, still pending
            lost_ids += await self._orphaned_pending(exclude={e.id for e in live})
        for entry_id in lost_ids:
            await self.dead_letter(Entry(entry_id, {}), "deleted from the stream while pending")
        if live:
            log.info("entries_reclaimed", stream=self.stream, group=self.group, count=len(live))
        return await self._screen(live)

    async def _read_own_pending(self, count: int) -> list[Entry]:
        assert self._pending_cursor is not None
        since = {self.stream: self._pending_cursor}
        reply: Any = await self.blocking.xreadgroup(self.group, self.consumer, since, count=count)
        items = [(i, f) for _, batch in reply or [] for i, f in batch]
        if not items:
            self._pending_cursor = None
            return []
        self._pending_cursor = as_str(items[-1][0])
        live = []
        for i, fields in items:
            if fields:
                live.append(Entry(as_str(i), fields))
            else:
                await self.dead_letter(Entry(as_str(i), {}), "deleted from the stream while pending")
        return await self._screen(live)

    async def _screen(self, entries: list[Entry]) -> list[Entry]:
        """Attach delivery counts; dead-letter entries delivered more than `max_deliveries` times."""
        if not entries:
            return []
        counts = await self._delivery_counts(entries[0].id, entries[-1].id, len(entries) + len(self.in_hand))
        kept = []
        for e in entries:
            entry = Entry(e.id, e.fields, counts.get(e.id, 1))
            if entry.deliveries > self.config.max_deliveries:
                await self.dead_letter(
                    entry, f"delivered {entry.deliveries} times (max_deliveries={self.config.max_deliveries})"
                )
            else:
                kept.append(entry)
        return self._hand_out(kept)

    async def _delivery_counts(self, first: str, last: str, count: int) -> dict[str, int]:
        rows = await self.redis.xpending_range(
            self.stream, self.group, min=first, max=last, count=count, consumername=self.consumer
        )
        return {as_str(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def _orphaned_pending(self, exclude: set[str]) -> list[str]:
        """Ids pending to this consumer that it neither holds nor just got: deleted entries (Redis 6.2)."""
        rows = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=10_000, consumername=self.consumer
        )
        ids = (as_str(r["message_id"]) for r in rows)
        return [i for i in ids if i not in exclude and i not in self.in_hand]

    def _hand_out(self, entries: Iterable[Entry]) -> list[Entry]:
        """Entries this consumer now holds. One marked `lost` earlier and handed out again (reclaimed back, or
        pending to it again after Redis rolled back the takeover) is ours again: a stale mark made its new work
        drop it as taken over while it stayed in hand, kept alive by the keep-alive and pending for ever."""
        out = list(entries)
        ids = {e.id for e in out}
        self.in_hand |= ids
        self.lost -= ids
        return out


def as_str(value: Any) -> str:
    """Redis replies hold bytes; ids and names are text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def no_such_key(exc: BaseException) -> bool:
    """XINFO on a stream that does not exist (any more)."""
    return isinstance(exc, rexc.ResponseError) and "no such key" in str(exc).lower()
