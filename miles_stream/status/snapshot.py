"""A snapshot of one namespace: streams, consumer groups, lag, pending, dead letters, members, weights."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc

from miles_stream.bus.done import done_count
from miles_stream.bus.heartbeat import Member, alive_members
from miles_stream.bus.keys import Keys
from miles_stream.bus.streams import as_str
from miles_stream.evaluation.follow import parse_results
from miles_stream.evaluation.record import EvalResult
from miles_stream.weights.versions import WeightSubscriber

Partitions = Sequence[tuple[aioredis.Redis, Keys]]  # each partition's control client and keys (bus/partitioned.py)


@dataclass(frozen=True, slots=True)
class GroupStatus:
    name: str
    consumers: int
    pending: int
    lag: int | None  # None where Redis cannot tell (6.2)
    last_delivered_id: str


@dataclass(frozen=True, slots=True)
class StreamStatus:
    key: str
    length: int
    groups: tuple[GroupStatus, ...]


@dataclass(frozen=True, slots=True)
class NamespaceStatus:
    namespace: str
    server_version: str
    streams: tuple[StreamStatus, ...]
    members: tuple[Member, ...]
    latest_weight_version: int | None
    dead_letters: int
    done_groups: dict[str, int] = field(default_factory=dict)
    evals: tuple[EvalResult, ...] = ()  # the newest result of each evaluator, newest first (from {ns}:eval)
    taken_at: float = 0.0  # unix time of the snapshot (rates in `status --watch` come from two of them)

    @property
    def last_eval(self) -> EvalResult | None:
        return self.evals[0] if self.evals else None

    def stream(self, key: str) -> StreamStatus:
        return next(s for s in self.streams if s.key == key)

    @property
    def versions_in_use(self) -> dict[str, int]:
        """Producer id -> the weight version it generates with (from its heartbeat)."""
        return {m.id: int(m.info["weight_version"]) for m in self.members
                if m.role == "producer" and "weight_version" in m.info}  # fmt: skip

    @property
    def producer_lag(self) -> int | None:
        """Versions the most behind producer lags the latest published one: the staleness of what it makes."""
        in_use = self.versions_in_use.values()
        if not in_use or self.latest_weight_version is None:
            return None
        return self.latest_weight_version - min(in_use)


async def namespace_status(
    redis: aioredis.Redis, keys: Keys, heartbeat_ttl_s: float, partitions: Partitions = ()
) -> NamespaceStatus:
    """The namespace's status. With `partitions` (bus.partitions > 1: each partition's control client and keys)
    each partition's streams are listed on their own (`{ns.p0}:prompts`, ...), and the done groups and dead
    letters are summed over the partitions."""
    try:
        info = await redis.info("server")
    except rexc.NoPermissionError:  # an ACL user limited to data commands (docs/redis.md): no server version
        info = {}
    parts = list(partitions) or [(redis, keys)]
    own = [k for k in keys.streams if len(parts) == 1 or k not in keys.partition_streams]
    streams = tuple([await stream_status(redis, key) for key in own]
                    + [await stream_status(c, key) for c, k in parts[1 if len(parts) == 1 else 0 :]
                       for key in k.partition_streams])  # fmt: skip
    latest = await WeightSubscriber(redis, keys, {}).latest()  # a malformed announcement is not the latest
    version = latest[1].version if latest is not None else None
    group_names = {g.name for s in streams for g in s.groups}
    done = {name: sum([await done_count(c, k.done(name)) for c, k in parts]) for name in sorted(group_names)}
    dead = {k.dead for _, k in parts}
    return NamespaceStatus(
        namespace=keys.namespace,
        server_version=describe_server(info),
        streams=streams,
        members=tuple(await alive_members(redis, keys, heartbeat_ttl_s)),
        latest_weight_version=version,
        dead_letters=sum(s.length for s in streams if s.key in dead),
        done_groups={k: v for k, v in done.items() if v},
        evals=await latest_evals(redis, keys),
        taken_at=time.time(),
    )


async def latest_evals(redis: aioredis.Redis, keys: Keys, look_back: int = 64) -> tuple[EvalResult, ...]:
    """The newest result of each evaluator among the last `look_back` entries of `{ns}:eval`, newest first."""
    entries: Any = await redis.xrevrange(keys.eval, count=look_back)
    newest: dict[str, EvalResult] = {}
    for result in parse_results(entries):
        newest.setdefault(result.evaluator_id, result)
    return tuple(newest.values())


def describe_server(info: dict[str, Any]) -> str:
    """ "valkey 8.1.8" / "redis 7.0.15" from INFO server; "?" where INFO is not allowed (an ACL user)."""
    name = str(info.get("server_name", "redis"))
    version = info.get(f"{name}_version") or info.get("redis_version")
    return f"{name} {version}" if version else "?"


async def stream_status(redis: aioredis.Redis, key: str) -> StreamStatus:
    length = int(await redis.xlen(key))
    try:
        groups = await redis.xinfo_groups(key)
    except rexc.ResponseError:  # the stream does not exist yet
        groups = []
    return StreamStatus(
        key=key,
        length=length,
        groups=tuple(
            GroupStatus(
                name=as_str(g["name"]),
                consumers=int(g["consumers"]),
                pending=int(g["pending"]),
                lag=None if g.get("lag") is None else int(g["lag"]),
                last_delivered_id=as_str(g["last-delivered-id"]),
            )
            for g in groups
        ),
    )
