"""XADD and XREADGROUP of one large entry through redis-py (async and sync) and the data-plane client.

    python bench/bench_clients.py [--mb 13.66] [--redis-binary PATH]

Each client adds an entry to a stream trimmed to a few entries (so Redis reuses its memory, as under real
trimming), then reads one back through a consumer group. Medians of --reps runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from miles_stream.bus import RedisConfig, open_stream_client
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig


async def median_ms(fn: Callable[[], Awaitable[Any]], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


async def measure(name: str, client: Any, stream: str, data: bytes, reps: int, ctl: aioredis.Redis) -> None:
    await ctl.xgroup_create(stream, "g", id="$", mkstream=True)
    is_sync = isinstance(client, redis.Redis)

    async def call(method: str, *args: Any, **kw: Any) -> Any:
        fn = getattr(client, method)
        return fn(*args, **kw) if is_sync else await fn(*args, **kw)

    add = await median_ms(lambda: call("xadd", stream, {b"d": data}, maxlen=3), reps)
    await ctl.xgroup_setid(stream, "g", id="0")
    read = await median_ms(lambda: call("xreadgroup", "g", "c", {stream: ">"}, count=1), min(reps, 3))
    print(f"{name:28s} XADD {add:6.1f} ms   XREADGROUP {read:6.1f} ms")


async def main_async(url: str, mb: float, reps: int) -> None:
    data = os.urandom(int(mb * 1e6))
    ctl = aioredis.Redis.from_url(url)
    await measure("redis-py async (hiredis)", aioredis.Redis.from_url(url), "c:async", data, reps, ctl)
    await measure("redis-py sync (hiredis)", redis.Redis.from_url(url), "c:sync", data, reps, ctl)
    dataplane = open_stream_client(RedisConfig(url=url))
    await measure("miles-stream data plane", dataplane, "c:dp", data, reps, ctl)
    await dataplane.aclose()
    await ctl.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=13.66)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--redis-binary", default="")
    parser.add_argument("--allocator-conf", default=None, help="MALLOC_CONF for Redis ('' = allocator defaults)")
    args = parser.parse_args()
    config = EmbeddedRedisConfig(persistence="none", maxmemory="8gb", binary=args.redis_binary)
    if args.allocator_conf is not None:
        config = dataclasses.replace(config, allocator_conf=args.allocator_conf)
    with EmbeddedRedis(config) as s:
        print(f"Redis {s.version}, entry of {args.mb} MB, MALLOC_CONF={config.allocator_conf!r}")
        asyncio.run(main_async(s.url, args.mb, args.reps))


if __name__ == "__main__":
    main()
