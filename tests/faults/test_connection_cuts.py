"""Connections cut again and again (CLIENT KILL TYPE normal, every 50 ms) under the feeder and under the trainer's
group consumer, on a real server: every call on their hot paths rides it out, and the accounting is exact."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from miles_stream.bus import BusConfig, GroupConsumer, Keys, RetryPolicy, StreamClient, StreamConsumer, publish
from miles_stream.bus.done import done_count
from miles_stream.codec import GroupCodec
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.prompts import decode_prompt
from miles_stream.testing.synthetic import synthetic_group

pytestmark = pytest.mark.timeout(180)


async def cut_connections(redis: aioredis.Redis, stop: asyncio.Event) -> int:
    """CLIENT KILL every normal connection but this one, every 50 ms, until `stop`; returns how many were cut."""
    cut = 0
    while not stop.is_set():
        with contextlib.suppress(Exception):
            cut += int(await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return cut


@pytest.fixture
async def killer(redis_url: str) -> aioredis.Redis:
    client = aioredis.from_url(redis_url)  # its own connection (SKIPME): never cut
    yield client
    await client.aclose()


async def test_the_feeder_publishes_every_prompt_once_through_cuts(
    redis: aioredis.Redis, killer: aioredis.Redis, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "label": str(i)}) + "\n" for i in range(300)))
    config = FeederConfig(path=str(path), max_queued=100_000)
    stop = asyncio.Event()
    cuts = asyncio.create_task(cut_connections(killer, stop))
    try:
        published = await asyncio.wait_for(Feeder(redis, keys, bus_config, config, load_rows(config)).run(), 120)
    finally:
        stop.set()
        n_cut = await cuts
    entries = await RetryPolicy().run(lambda: redis.xrange(keys.prompts))  # the last cut may have hit this client
    indices = [decode_prompt(fields[b"d"]).index for _, fields in entries]
    assert n_cut > 0
    assert published == 300 and sorted(indices) == list(range(300))  # each once: no loss, no second copy


async def test_the_group_consumer_reads_and_commits_every_group_once_through_cuts(
    redis: aioredis.Redis, blocking: StreamClient, killer: aioredis.Redis, keys: Keys, bus_config: BusConfig
) -> None:
    codec, rng = GroupCodec(), np.random.default_rng(0)
    for i in range(120):
        group = synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50, group_id=f"g{i}")
        await publish(redis, keys.trajectories, codec.encode(group), maxlen=bus_config.maxlen_cap)
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                            dead_stream=keys.dead, config=bus_config)  # fmt: skip
    consumer = GroupConsumer(stream, keys, codec, retry=RetryPolicy(attempts=0, base_delay_s=0.01, max_delay_s=0.1))
    await consumer.start()
    stop = asyncio.Event()
    cuts = asyncio.create_task(cut_connections(killer, stop))
    got: list[str] = []
    try:
        async with asyncio.timeout(120):
            while len(got) < 120:
                batch = await consumer.read(10)
                held = await consumer.still_held(batch)
                await consumer.commit(held)
                got += [r.group_id for r in held]
    finally:
        stop.set()
        n_cut = await cuts
    assert n_cut > 0
    assert sorted(got) == sorted(f"g{i}" for i in range(120))  # every group once
    assert await RetryPolicy().run(lambda: done_count(redis, keys.done("trainer"))) == 120
    assert (await redis.xpending(keys.trajectories, "trainer"))["pending"] == 0
