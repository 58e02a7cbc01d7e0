"""Weight versions: the trainer publishes, producers follow.

    trainer ──WeightPublisher.publish(v, state)──► transport.write ──► XADD {ns}:weights {version, manifest}
    producer ◄── WeightSubscriber.latest() / .next_after(id) ◄── transport.read (checksums verified)

Old versions are deleted once no live producer reports using them (heartbeat field `weight_version`); the
newest is always kept, so a producer attached later loads it before it generates. A version written and never
announced (the trainer died in between) is deleted by the next publication's prune.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
import torch

from miles_stream.bus import Keys, RetryPolicy, alive_members
from miles_stream.bus.connection import is_transient
from miles_stream.bus.lease import Lease
from miles_stream.bus.streams import VERSION
from miles_stream.errors import SchemaError, WeightIntegrityError
from miles_stream.weights.manifest import WeightManifest, decode_manifest, encode_manifest
from miles_stream.weights.transports import WeightTransport

log = structlog.get_logger(__name__)
MANIFEST = b"manifest"
_LOOK_BACK = 16  # announcements `latest` reads to find one that decodes


@dataclass(slots=True)
class WeightPublisher:
    redis: aioredis.Redis
    keys: Keys
    transport: WeightTransport
    heartbeat_ttl_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fence: Lease | None = None  # with a lease, versions are drawn and announced only while it is held

    @property
    def versions_key(self) -> str:
        return f"{self.keys.weights}:versions"

    @property
    def last_version_key(self) -> str:
        """The last version number handed out; numbers are drawn from it and never reused."""
        return f"{self.keys.weights}:last_version"

    async def new_version(self, after: int) -> int:
        """Draw the next version number: above every number drawn before in this namespace and above
        `after` (the trainer's own, in case Redis lost the counter). Under the lease when there is one."""

        async def draw() -> int:
            (drawn,) = await self._run(lambda pipe: pipe.incr(self.last_version_key))
            if int(drawn) > after:
                return int(drawn)
            await self._run(lambda pipe: pipe.set(self.last_version_key, after + 1))
            return after + 1

        return await self.retry.run(draw)  # a retry after an applied INCR skips a number; none is reused

    async def _run(self, queue: Callable[[Any], object]) -> list[Any]:
        if self.fence is not None:
            return await self.fence.fenced(queue)
        async with self.redis.pipeline(transaction=True) as pipe:
            queue(pipe)
            result: list[Any] = await pipe.execute()
            return result

    async def publish(self, version: int, state: dict[str, torch.Tensor]) -> WeightManifest:
        """Write the version, then announce it (both retried through a Redis outage by `retry`: rewriting
        chunks is idempotent, and a second announcement of a version is ignored by subscribers)."""
        manifest = await self.retry.run(lambda: self.transport.write(version, state))

        def announce(pipe: Any) -> None:
            pipe.zadd(self.versions_key, {str(version): version})
            pipe.xadd(self.keys.weights, {VERSION: str(version), MANIFEST: encode_manifest(manifest)},
                      maxlen=1000, approximate=True)  # fmt: skip

        await self.retry.run(lambda: self._run(announce))  # LeaseLostError: not announced
        log.info("weights_published", version=version, bytes=manifest.nbytes, transport=self.transport.name)
        try:
            await self.prune(latest=version)
        except Exception as exc:  # pruning is housekeeping: the next publication prunes again
            if not is_transient(exc):
                raise
            log.warning("weights_prune_failed", error=str(exc))
        return manifest

    async def prune(self, latest: int) -> list[int]:
        """Delete versions older than every version a live producer uses (the latest is always kept), and
        versions below `latest` that were written and never announced.

        A trainer killed after its transport wrote a version and before the announcement left that version's
        bytes behind (a full model copy per crash) with nothing pointing at them. Version numbers are drawn in
        increasing order and one trainer (the lease holder) publishes one version at a time, so a version below
        the one just announced that is not announced never will be: it is no one's in-flight publication. One
        above `latest` is left for a later pass (a fenced-out trainer may still be writing it).
        """
        members = await alive_members(self.redis, self.keys, self.heartbeat_ttl_s)
        in_use = [int(m.info["weight_version"]) for m in members if "weight_version" in m.info]
        floor = min([latest, *in_use])
        announced: Any = await self.redis.zrange(self.versions_key, 0, -1)
        listed: Any = await self.redis.zrangebyscore(self.versions_key, "-inf", f"({floor}")
        old = [int(v) for v in listed]
        known = {int(v) for v in announced} | {latest}
        never_announced = [v for v in await self.transport.stored() if v < latest and v not in known]
        for v in old + never_announced:
            await self.transport.delete(v)
        if old:
            await self.redis.zremrangebyscore(self.versions_key, "-inf", f"({floor}")
        if never_announced:
            log.warning("weights_never_announced_pruned", versions=never_announced)
        return sorted(old + never_announced)


@dataclass(slots=True)
class WeightSubscriber:
    redis: aioredis.Redis
    keys: Keys
    transports: dict[str, WeightTransport]

    async def latest(self) -> tuple[str, WeightManifest] | None:
        """(entry id, manifest) of the newest announcement that decodes, or None. A malformed one (no
        manifest, or one that does not decode) is logged and passed over: it must not stop a producer or a
        trainer's start (it did)."""
        entries: Any = await self.redis.xrevrange(self.keys.weights, count=_LOOK_BACK)
        for entry in entries:
            if (parsed := _parse(entry)) is not None:
                return parsed
        return None

    async def next_after(self, entry_id: str, block_ms: int) -> tuple[str, WeightManifest | None] | None:
        """The newest announcement after `entry_id`, waiting up to `block_ms`: (the newest entry id read, its
        manifest, or None where every new entry was malformed). None if nothing came."""
        reply: Any = await self.redis.xread({self.keys.weights: entry_id}, block=block_ms)
        if not reply:
            return None
        entries = reply[0][1]
        newest = entries[-1][0].decode()
        for entry in reversed(entries):
            if (parsed := _parse(entry)) is not None:
                return newest, parsed[1]
        return newest, None

    async def announced_after(self, entry_id: str, block_ms: int) -> tuple[str, list[WeightManifest]] | None:
        """Every announcement after `entry_id` (waiting up to `block_ms`), oldest first: (the newest entry id
        read, the manifests that decode). None if nothing came."""
        reply: Any = await self.redis.xread({self.keys.weights: entry_id}, block=block_ms)
        if not reply:
            return None
        entries = reply[0][1]
        return entries[-1][0].decode(), [parsed[1] for e in entries if (parsed := _parse(e)) is not None]

    async def load(self, manifest: WeightManifest) -> dict[str, torch.Tensor]:
        transport = self.transports.get(manifest.transport)
        if transport is None:
            raise WeightIntegrityError(f"version {manifest.version} uses transport {manifest.transport!r}, "
                                       f"this process has {sorted(self.transports)}")  # fmt: skip
        return await transport.read(manifest)


def _parse(entry: Any) -> tuple[str, WeightManifest] | None:
    entry_id, fields = entry
    try:
        return entry_id.decode(), decode_manifest(fields[MANIFEST])
    except (KeyError, SchemaError) as exc:
        log.error("weights_announcement_malformed", id=entry_id.decode(), error=str(exc) or "no manifest field")
        return None
