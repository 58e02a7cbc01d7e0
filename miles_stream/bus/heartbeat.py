"""Heartbeats: every long-lived process says it is alive, so `status` can list producers and trainers.

Each process refreshes its score (unix time) in the `{ns}:members` sorted set and its description in the
`{ns}:members:info` hash every `heartbeat_interval_s`. A member is alive while its score is younger than
`heartbeat_ttl_s`; whoever lists members also drops the ones long dead. Clocks are the processes' own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
import structlog

from miles_stream.aio import stop_task
from miles_stream.bus.connection import is_transient
from miles_stream.bus.keys import Keys
from miles_stream.bus.run import RunIdentity, check_run, run_key
from miles_stream.bus.streams import BusConfig
from miles_stream.errors import DataLossError

log = structlog.get_logger(__name__)
_FORGET_AFTER_TTLS = 30


@dataclass(frozen=True, slots=True)
class Member:
    role: str
    id: str
    last_seen: float
    info: dict[str, Any]

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.last_seen)


class Heartbeat:
    """Background loop that keeps one process listed as alive. `async with` starts and stops it."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        role: str,
        member_id: str,
        config: BusConfig,
        describe: Callable[[], dict[str, Any]] | None = None,
        run: RunIdentity | None = None,
        on_data_loss: Callable[[], None] | None = None,
    ) -> None:
        self.redis, self.keys, self.config = redis, keys, config
        self.role, self.member_id = role, member_id
        self.describe = describe or dict
        self.run, self.on_data_loss = run, on_data_loss
        self.data_lost: DataLossError | None = None  # set when a beat found the run gone (see bus/run.py)
        self._task: asyncio.Task[None] | None = None
        self._started_at = time.time()

    @property
    def name(self) -> str:
        return f"{self.role}:{self.member_id}"

    async def beat(self) -> None:
        info = {
            "role": self.role,
            "id": self.member_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started_at,
            **self.describe(),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(run_key(self.keys))
            pipe.zadd(self.keys.members, {self.name: time.time()})
            pipe.hset(self.keys.member_info, self.name, json.dumps(info))
            current, *_ = await pipe.execute()
        if self.run is not None and self.data_lost is None:
            try:
                check_run(self.keys, self.run, current)
            except DataLossError as exc:
                self.data_lost = exc
                log.error("data_loss_detected", member=self.name, error=str(exc))
                if self.on_data_loss is not None:
                    self.on_data_loss()

    async def beat_now(self) -> None:
        """Beat now rather than at the next interval, and return once it is in Redis: the description changed
        in a way others act on (a trainer's version or held count, which producers' admission reads). A Redis
        blip is logged, not raised: the next beat carries the same news."""
        try:
            await self.beat()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("heartbeat_failed", member=self.name, error=str(exc))

    async def start(self) -> None:
        if self._task is None:
            await self.beat()
            self._task = asyncio.create_task(self._loop(), name=f"heartbeat-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if not await stop_task(task):
            log.error("heartbeat_did_not_stop", member=self.name)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.members, self.name)
                pipe.hdel(self.keys.member_info, self.name)
                await pipe.execute()
        except Exception as exc:  # leaving while Redis is down: the entry simply ages out
            if not is_transient(exc):
                raise
            log.warning("heartbeat_unregister_failed", member=self.name, error=str(exc))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            await self.beat_now()

    async def __aenter__(self) -> Heartbeat:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def alive_members(redis: aioredis.Redis, keys: Keys, ttl_s: float) -> list[Member]:
    """Members whose last heartbeat is younger than `ttl_s`, oldest name first; forgets long-dead ones."""
    now = time.time()
    stale_before = now - ttl_s * _FORGET_AFTER_TTLS
    stale: Any = await redis.zrangebyscore(keys.members, "-inf", stale_before)
    if stale:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.members, *stale)
            pipe.hdel(keys.member_info, *stale)
            await pipe.execute()
    rows: Any = await redis.zrangebyscore(keys.members, now - ttl_s, "+inf", withscores=True)
    if not rows:
        return []
    infos = await redis.hmget(keys.member_info, [name for name, _ in rows])
    members = []
    for (name, score), raw in zip(rows, infos, strict=True):
        member = _member(name, float(score), raw)
        if member is not None:
            members.append(member)
    return sorted(members, key=lambda m: (m.role, m.id))


# What readers of heartbeats do arithmetic on (admission, pruning, status): a number or absent.
_NUMBERS = ("max_staleness", "rollout_batch_size", "publish_every", "read_per_batch", "version", "held", "in_flight",
            "weight_version")  # fmt: skip
_reported: set[bytes] = set()


def _member(name: bytes, score: float, raw: Any) -> Member | None:
    """The member a heartbeat describes, or None (logged once per name) where it does not decode: a poisoned
    or foreign entry in the members hash must not stop every producer's admission or a trainer's pruning."""
    try:
        role, sep, member_id = name.decode().partition(":")
        info = json.loads(raw) if raw else {}
        if not sep or not isinstance(info, dict):
            raise ValueError("not role:id with a JSON object")
        for key in _NUMBERS:
            if key in info and (isinstance(info[key], bool) or not isinstance(info[key], int | float)):
                raise ValueError(f"{key} is {info[key]!r}, not a number")
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if name not in _reported:
            _reported.add(name)
            log.warning("heartbeat_malformed", member=name.decode(errors="replace"), error=str(exc))
        return None
    return Member(role, member_id, score, info)
