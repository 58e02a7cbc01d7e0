"""The done set stays bounded: a committed group is forgotten once no copy of it can reach the trainer any more
(`bus/done.py`), and the count of groups done stays exact."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis_groups import publish_groups

from miles_stream.bus import BusConfig, Entry, GroupConsumer, Keys, StreamClient, StreamConsumer, publish
from miles_stream.bus.done import server_ms
from miles_stream.bus.keys import PRODUCER_GROUP, TRAINER_GROUP
from miles_stream.testing.synthetic import synthetic_group

pytestmark = pytest.mark.integration


def consumer(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus: BusConfig, stream: str, group: str
) -> StreamConsumer:
    return StreamConsumer(redis, blocking, stream=stream, group=group, consumer="c", dead_stream=keys.dead,
                          config=bus)  # fmt: skip


async def prompts_in_hand(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus: BusConfig, n: int
) -> tuple[StreamConsumer, list[Entry]]:
    """n prompt entries, claimed by a producer (pending: not acked yet)."""
    producers = consumer(redis, blocking, keys, bus, keys.prompts, PRODUCER_GROUP)
    await producers.start()
    for i in range(n):
        await publish(redis, keys.prompts, f"p{i}".encode(), maxlen=1000)
    got: list[Entry] = []
    while len(got) < n:
        got += await producers.read(n)
    return producers, got


async def trained(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus: BusConfig, redis_url: str, ids: list[str]
) -> GroupConsumer:
    trainer = GroupConsumer(consumer(redis, blocking, keys, bus, keys.trajectories, TRAINER_GROUP), keys)
    await trainer.start()
    await publish_groups(
        redis_url,
        keys.namespace,
        [synthetic_group(np.random.default_rng(i), group_id=g, prompt_key=g) for i, g in enumerate(ids)],
    )
    got = []
    while len(got) < len(ids):
        got += await trainer.read(len(ids))
    await trainer.commit(got)
    return trainer


async def past_the_margin(redis: aioredis.Redis, trainer: GroupConsumer) -> None:
    """Wait until Redis's clock has passed every score (commit time + margin): only then may a sweep forget."""
    top = await redis.zrange(trainer.done.key, 0, 0, desc=True, withscores=True)
    deadline = time.monotonic() + 30
    while top and await server_ms(redis, trainer.done.clock) <= top[0][1]:
        assert time.monotonic() < deadline, "Redis's clock did not pass the scores"
        await asyncio.sleep(0.02)


async def test_committed_groups_are_forgotten_once_their_prompts_are_acked_and_every_copy_is_read(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    producers, entries = await prompts_in_hand(redis, blocking, keys, bus_config, 3)
    trainer = await trained(redis, blocking, keys, bus_config, redis_url, ["g0", "g1", "g2"])
    await producers.ack([e.id for e in entries])  # published, then acked: no producer makes them again
    await past_the_margin(redis, trainer)
    assert await trainer.done.sweep() == 0  # phase 1 marks the horizon and the stream's end
    assert await trainer.done.sweep() == 3  # phase 2: the trainer has read past it; forgotten
    assert await redis.zcard(trainer.done.key) == 0
    assert await trainer.done.count() == 3  # still counted
    assert await trainer.done.sweep() == 0 and await trainer.done.sweep() == 0  # nothing more to forget


async def test_a_group_is_kept_while_its_prompt_is_unacked_and_its_late_copy_is_dropped(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    """A producer published g0 and stalled before its ack: another may still make g0 again from that prompt."""
    producers, entries = await prompts_in_hand(redis, blocking, keys, bus_config, 1)
    trainer = await trained(redis, blocking, keys, bus_config, redis_url, ["g0"])
    await past_the_margin(redis, trainer)
    for _ in range(4):
        assert await trainer.done.sweep() == 0
    assert await trainer.done.contains(["g0"]) == [True]
    await publish_groups(
        redis_url, keys.namespace, [synthetic_group(np.random.default_rng(0), group_id="g0", prompt_key="g0")]
    )
    again = []
    while trainer.counters.duplicates < 1:
        again += await trainer.read(4)
    assert again == []  # the copy is dropped, not trained
    await producers.ack([entries[0].id])
    assert await trainer.done.sweep() == 0
    assert await trainer.done.sweep() == 1


async def test_a_copy_on_the_stream_not_yet_read_holds_the_sweep_until_it_is(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    producers, entries = await prompts_in_hand(redis, blocking, keys, bus_config, 1)
    trainer = await trained(redis, blocking, keys, bus_config, redis_url, ["g0"])
    await publish_groups(
        redis_url, keys.namespace, [synthetic_group(np.random.default_rng(0), group_id="g0", prompt_key="g0")]
    )
    await producers.ack([entries[0].id])
    await past_the_margin(redis, trainer)
    assert await trainer.done.sweep() == 0  # marks: the copy is at or before the stream's end
    for _ in range(3):
        assert await trainer.done.sweep() == 0  # the trainer has not read it: it must still know g0
    assert await trainer.read(4) == [] and trainer.counters.duplicates == 1
    assert await trainer.done.sweep() == 1
    assert int((await redis.xinfo_groups(keys.trajectories))[0]["pending"]) == 0


async def test_a_consumer_sweeps_by_itself_as_it_commits(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    """With `bus.done_sweep_s` small, commits drive the sweep: the set holds only what came since."""
    bus = dataclasses.replace(bus_config, done_sweep_s=0.001)
    trainer = GroupConsumer(consumer(redis, blocking, keys, bus, keys.trajectories, TRAINER_GROUP), keys)
    await trainer.start()
    for i in range(6):
        await publish_groups(
            redis_url, keys.namespace, [synthetic_group(np.random.default_rng(i), group_id=f"g{i}", prompt_key=str(i))]
        )
        got = []
        while not got:
            got = await trainer.read(1)
        await trainer.commit(got)
    assert await trainer.done.count() == 6
    await past_the_margin(redis, trainer)
    while await redis.zcard(trainer.done.key):  # no prompt stream at all: nothing can make a copy
        await trainer._maybe_sweep()  # what every commit does
    assert await trainer.done.count() == 6


async def test_a_done_set_from_an_earlier_build_is_upgraded_and_still_drops_copies(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str
) -> None:
    await redis.sadd(keys.done(TRAINER_GROUP), "g0", "g1")  # a plain SET, as builds before the sweep wrote it
    trainer = GroupConsumer(consumer(redis, blocking, keys, bus_config, keys.trajectories, TRAINER_GROUP), keys)
    await trainer.start()
    assert await trainer.done.contains(["g0", "g1", "g2"]) == [True, True, False]
    assert await trainer.done.count() == 2
    groups = [synthetic_group(np.random.default_rng(i), group_id=f"g{i}", prompt_key=str(i)) for i in range(3)]
    await publish_groups(redis_url, keys.namespace, groups)
    got = []
    while trainer.counters.duplicates + len(got) < 3:
        got += await trainer.read(3)
    assert [r.group_id for r in got] == ["g2"]
