from __future__ import annotations

import asyncio

import pytest
import redis.exceptions as rexc

from miles_stream.bus import RetryPolicy
from miles_stream.bus.connection import is_transient
from miles_stream.bus.dataplane import _error as dataplane_error
from miles_stream.errors import ConfigError, DataLossError, RedisUnavailableError


async def test_transient_errors_are_retried_until_success() -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise rexc.ConnectionError("gone")
        return "ok"

    retries: list[int] = []
    policy = RetryPolicy(attempts=5, base_delay_s=0.001, max_delay_s=0.002)
    assert await policy.run(flaky, on_retry=lambda n, exc: retries.append(n)) == "ok"
    assert retries == [1, 2]


async def test_redis_out_of_memory_is_transient() -> None:
    calls = []

    async def full() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise rexc.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        return "ok"

    assert await RetryPolicy(base_delay_s=0.001, max_delay_s=0.002).run(full) == "ok"


async def test_a_stop_during_a_long_backoff_gives_up_within_the_stop_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Told to stop while it waits out a 30 s backoff, a retry loop wakes, tries again for stop_grace_s, then gives
    up (before: it slept the backoff out, past a process's stop grace: a trainer stopped in a Redis outage was
    cancelled instead of checkpointing; seen once in CI, when the jittered backoff came out long)."""
    monkeypatch.setattr(RetryPolicy, "delay", lambda self, attempt: 30.0)  # the jitter's worst case, every time
    stop = asyncio.Event()
    policy = RetryPolicy(attempts=0, stop=stop, stop_grace_s=0.5)

    async def down() -> None:
        raise rexc.ConnectionError("refused")

    asyncio.get_running_loop().call_later(0.1, stop.set)
    with pytest.raises(RedisUnavailableError, match=r"^stopping, and Redis is still unavailable"):
        await asyncio.wait_for(policy.run(down), 10.0)  # the bound: far more than the grace, less than a backoff


async def test_other_errors_are_not_retried() -> None:
    calls = []

    async def wrong() -> None:
        calls.append(1)
        raise rexc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
        await RetryPolicy(base_delay_s=0.001, max_delay_s=0.002).run(wrong)
    assert len(calls) == 1


async def test_gives_up_after_the_last_attempt_with_a_typed_error() -> None:
    async def down() -> None:
        raise rexc.TimeoutError("slow")

    with pytest.raises(RedisUnavailableError, match="gave up after 3 attempts: slow"):
        await RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.002).run(down)


def test_backoff_is_bounded_and_validated() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=0.5)
    assert all(0 <= policy.delay(n) <= 0.5 for n in range(20))
    with pytest.raises(ConfigError, match=r"retry\.base_delay_s"):
        RetryPolicy(base_delay_s=2.0, max_delay_s=1.0)


@pytest.mark.parametrize(
    "reply",
    [
        "NOGROUP No such key 'ns:trajectories' or consumer group 'trainers' in XREADGROUP with GROUP option",
        "UNBLOCKED the stream key no longer exists",  # Redis 7.0, a blocked read whose stream was flushed
    ],
)
async def test_a_vanished_stream_or_group_is_data_loss_not_retried(reply: str) -> None:
    calls = []

    async def gone() -> None:
        calls.append(1)
        raise rexc.ResponseError(reply)

    with pytest.raises(DataLossError, match="reset-run"):
        await RetryPolicy(base_delay_s=0.001).run(gone)
    assert calls == [1]


def test_the_data_planes_cluster_errors_are_transient_and_its_redirects_are_not() -> None:
    """CLUSTERDOWN (a failover) and TRYAGAIN (a migration) are retried; MOVED and ASK are the router's to follow,
    never the retry's (bus/slots.py)."""
    assert is_transient(dataplane_error("CLUSTERDOWN The cluster is down"))
    assert is_transient(dataplane_error("TRYAGAIN Multiple keys request during rehashing of slot"))
    assert not is_transient(dataplane_error("MOVED 3999 127.0.0.1:7001"))
    assert not is_transient(dataplane_error("ASK 3999 127.0.0.1:7001"))
