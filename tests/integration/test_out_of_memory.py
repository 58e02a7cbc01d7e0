"""Redis out of memory (maxmemory reached, noeviction) against a real server: what redis-py raises is
classified as transient, and a retried call goes through once memory is freed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from miles_stream.bus import RedisConfig, RetryPolicy, connect
from miles_stream.bus.connection import is_transient
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig


@pytest.fixture
def full_server(redis_binary: str) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(EmbeddedRedisConfig(binary=redis_binary, persistence="none", maxmemory="4mb")) as server:
        yield server


async def fill(client: aioredis.Redis) -> int:
    """Write 64 KiB values until the server refuses one; returns how many it took."""
    for i in range(10_000):
        try:
            await client.set(f"fill:{i}", b"x" * 65536)
        except rexc.ResponseError:
            return i
    raise AssertionError("maxmemory was never reached")


async def test_out_of_memory_is_transient_and_ridden_out(full_server: EmbeddedRedis) -> None:
    client = connect(RedisConfig(url=full_server.url))
    try:
        n = await fill(client)
        with pytest.raises(rexc.ResponseError) as refused:
            await client.set("one-more", b"y" * 65536)
        assert is_transient(refused.value), repr(refused.value)  # redis-py 8: OutOfMemoryError, no "OOM" prefix
        with pytest.raises(rexc.ResponseError) as in_multi:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set("in-multi", b"z" * 65536)
                pipe.incr("counter")
                await pipe.execute()
        assert is_transient(in_multi.value), repr(in_multi.value)

        retries: list[int] = []  # the write is retried while memory is full, and goes through once it is freed
        policy = RetryPolicy(attempts=0, base_delay_s=0.01, max_delay_s=0.05)
        write = asyncio.create_task(policy.run(lambda: client.set("one-more", b"y" * 65536),
                                               on_retry=lambda attempt, exc: retries.append(attempt)))  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 30
        while len(retries) < 2:
            assert asyncio.get_running_loop().time() < deadline and not write.done(), "never retried"
            await asyncio.sleep(0.01)
        await client.delete(*[f"fill:{i}" for i in range(n)])
        assert await asyncio.wait_for(write, 30) is True
        assert await client.exists("one-more") == 1
    finally:
        await client.aclose()
