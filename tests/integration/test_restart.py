"""Redis stopped and started again under a producer and a consumer: nothing is lost, nothing doubled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from miles_stream.bus import (
    BusConfig,
    GroupConsumer,
    GroupPublisher,
    Keys,
    RedisConfig,
    RetryPolicy,
    StreamConsumer,
    connect,
    open_stream_client,
)
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port
from miles_stream.testing.synthetic import synthetic_group


async def test_producer_and_consumer_ride_out_a_redis_restart_with_aof(tmp_path: Path, redis_binary: str) -> None:
    config = EmbeddedRedisConfig(binary=redis_binary, port=free_port(), data_dir=str(tmp_path), persistence="aof")
    server = EmbeddedRedis(config).start()
    keys = Keys("restart")
    bus = BusConfig(namespace="restart", block_ms=50, claim_interval_s=0.0)
    rc = RedisConfig(url=server.url, connect_timeout_s=0.5)
    redis, data = connect(rc), open_stream_client(rc, block_ms=bus.block_ms)
    stream = StreamConsumer(redis, data, stream=keys.trajectories, group="trainer", consumer="t0",
                            dead_stream=keys.dead, config=bus)  # fmt: skip
    consumer = GroupConsumer(stream, keys, retry=RetryPolicy(attempts=0, max_delay_s=0.2))
    publisher = GroupPublisher(data, keys.trajectories, bus, retry=RetryPolicy(attempts=0, max_delay_s=0.2))
    rng = np.random.default_rng(0)
    try:
        await consumer.start()
        sent = [synthetic_group(rng) for _ in range(6)]
        for g in sent[:3]:
            await publisher.publish(g)
        server.stop()  # SIGTERM: Redis flushes the AOF
        pending = asyncio.create_task(publisher.publish(sent[3]))  # retried while Redis is down
        await asyncio.sleep(0.5)
        assert not pending.done()
        server = EmbeddedRedis(config).start()
        await asyncio.wait_for(pending, timeout=10)
        for g in sent[4:]:
            await publisher.publish(g)
        got = []
        for _ in range(20):
            got += await consumer.read(10)
            if len(got) >= 6:
                break
        await consumer.commit(got)
        assert sorted(r.group.group_id for r in got) == sorted(g.group_id for g in sent)
        assert (await redis.xpending(keys.trajectories, "trainer"))["pending"] == 0
    finally:
        await data.aclose()
        await redis.aclose()
        server.stop()
