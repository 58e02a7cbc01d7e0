"""The run identity: how a process notices that Redis lost the run's data, instead of carrying on silently.

    {ns}:run   JSON {"id", "created", "reset_after_loss"}: written once (SET NX) by the first process of a run

Every feeder, producer and trainer joins the run at start and remembers its id. A Redis that restarted without
persistence, was flushed, or failed over to a replica that had not caught up, has lost this key with the
streams, the consumer groups, the done set and the feeder's position. A process that finds the key gone or
replaced (its heartbeat looks every beat; the feeder before every prompt; a NOGROUP reply anywhere) stops with
a `DataLossError` that says so. Nothing is skipped or trained twice without a person deciding it:

    miles-stream reset-run bus.namespace=NS    marks a new run as started deliberately after the loss; a
                                               trainer's --resume then continues its checkpoint into it
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from miles_stream.bus.keys import Keys
from miles_stream.errors import ConfigError, DataLossError

WHAT_TO_DO = ("Stop every process of the run. To go on, decide it: `miles-stream reset-run bus.namespace={ns}` "
              "starts the run's bookkeeping again (the feeder from its first prompt; a trainer's --resume "
              "continues its checkpoint); see docs/reliability.md")  # fmt: skip


@dataclass(frozen=True, slots=True)
class RunIdentity:
    id: str
    created: float
    reset_after_loss: bool = False

    def encode(self) -> str:
        return json.dumps({"id": self.id, "created": self.created, "reset_after_loss": self.reset_after_loss})


def run_key(keys: Keys) -> str:
    return f"{keys.namespace}:run"


def partitions_key(keys: Keys) -> str:
    """The run's partition count (`bus.partitions`), in the run's own slot: written by its first feeder."""
    return f"{keys.namespace}:partitions"


async def run_partitions(redis: aioredis.Redis, keys: Keys) -> int | None:
    """The partition count the run was fed with; None before its first feeder."""
    stored = await redis.get(partitions_key(keys))
    return None if stored is None else int(stored)


async def check_partitions(redis: aioredis.Redis, keys: Keys, partitions: int) -> None:
    """Raise `ConfigError` unless this process's `bus.partitions` is the run's: with another count it would read
    and commit in keys the run never wrote (and a trainer's --resume commit its claims into the wrong ones). The
    run's count is the one it was fed with, and before its first feed the count of the first process that came
    (`{ns}:partitions:first`, written if absent: a trainer started before the feeder with the default 1 would
    otherwise wait on a stream nobody writes)."""
    first_key = f"{partitions_key(keys)}:first"
    await redis.set(first_key, partitions, nx=True)
    first = await redis.get(first_key)
    fed = await run_partitions(redis, keys)
    if fed is not None and fed != partitions:
        raise ConfigError(f"bus.partitions: run {keys.namespace!r} was fed with {fed} partition(s) "
                          f"({partitions_key(keys)}); this process has {partitions}: give every process of the "
                          f"run its count, or use another namespace")  # fmt: skip
    if fed is None and first is not None and int(first) != partitions:
        raise ConfigError(f"bus.partitions: the first process of run {keys.namespace!r} came with {int(first)} "
                          f"partition(s) ({first_key}); this one has {partitions}: give every process the run's "
                          f"count (if that first one was the mistake and nothing was fed yet, stop it and run "
                          f"`miles-stream reset-run bus.namespace={keys.namespace}`)")  # fmt: skip


def decode_run(raw: Any) -> RunIdentity | None:
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return RunIdentity(str(d["id"]), float(d["created"]), bool(d.get("reset_after_loss", False)))
    except (ValueError, KeyError, TypeError):
        return RunIdentity(id=f"unreadable:{raw!r}", created=0.0)


async def join_run(redis: aioredis.Redis, keys: Keys) -> RunIdentity:
    """The namespace's run, created by this call where there is none yet."""
    fresh = RunIdentity(uuid.uuid4().hex, time.time())
    await redis.set(run_key(keys), fresh.encode(), nx=True)
    run = decode_run(await redis.get(run_key(keys)))
    return run or fresh


async def reset_run(redis: aioredis.Redis, keys: Keys) -> RunIdentity:
    """Start the run's bookkeeping again after a loss, on purpose: a new identity that says so."""
    run = RunIdentity(uuid.uuid4().hex, time.time(), reset_after_loss=True)
    await redis.set(run_key(keys), run.encode())
    return run


def check_run(keys: Keys, joined: RunIdentity, raw: Any) -> None:
    """Raise `DataLossError` unless `raw` (the run key's value now) is the run this process joined."""
    now = decode_run(raw)
    if now is not None and now.id == joined.id:
        return
    what = "is gone" if now is None else f"now names another run ({now.id})"
    raise DataLossError(f"Redis lost this run's data: {run_key(keys)} {what}, so its streams, consumer groups, "
                        f"done set and the feeder's position went with it (run {joined.id}). "
                        + WHAT_TO_DO.format(ns=keys.namespace))  # fmt: skip


async def verify_run(redis: aioredis.Redis, keys: Keys, joined: RunIdentity) -> None:
    check_run(keys, joined, await redis.get(run_key(keys)))
