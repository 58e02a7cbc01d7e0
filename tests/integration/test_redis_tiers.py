"""The server each tier starts is the one it names, as the server itself reports it (INFO server)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis_tiers import TIERS

from miles_stream.redis_server import ServerVersion


async def test_each_tier_runs_the_server_it_names(redis: aioredis.Redis, redis_tier: str) -> None:
    info = await redis.info("server")
    name = str(info.get("server_name", "redis"))
    running = ServerVersion(name, str(info.get(f"{name}_version") or info["redis_version"]))
    want_name, release = TIERS[redis_tier]
    assert running.is_release(want_name, release), f"the {redis_tier} tier runs {running}"
