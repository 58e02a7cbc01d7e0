"""The writer lease on a real server: one holder, fencing tokens that only grow, writes refused once lost."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import redis.asyncio as aioredis

from miles_stream.bus import Keys
from miles_stream.bus.lease import Lease
from miles_stream.errors import LeaseHeldError, LeaseLostError
from miles_stream.weights.transports import FileTransport
from miles_stream.weights.versions import WeightPublisher


async def until_expired(redis: aioredis.Redis, lease: Lease, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while await redis.exists(lease.key):
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.02)


async def test_a_second_holder_is_refused_with_the_first_named(redis: aioredis.Redis, keys: Keys) -> None:
    first, second = (Lease(redis, keys, "trainer", name, ttl_s=30) for name in ("a", "b"))
    assert await first.acquire() == 1
    with pytest.raises(LeaseHeldError, match=r"a \(pid \d+ on .*token 1\)"):
        await second.acquire(wait_s=0.2)
    await first.release()
    assert await second.acquire() == 2  # a released lease is free at once; tokens only grow


async def test_a_standby_takes_over_when_the_lease_expires(redis: aioredis.Redis, keys: Keys) -> None:
    frozen = Lease(redis, keys, "trainer", "frozen", ttl_s=0.3)  # takes it, never renews (as if SIGSTOPped)
    standby = Lease(redis, keys, "trainer", "standby", ttl_s=30)
    await frozen.acquire()
    assert await standby.acquire(wait_s=20) == 2
    done = keys.done("trainer")
    with pytest.raises(LeaseLostError, match="standby"):  # it wakes: its commit applies nothing
        await frozen.fenced(lambda pipe: pipe.sadd(done, "g1"))
    assert not await redis.exists(done)
    assert not await frozen.renew() and frozen.lost
    assert await standby.fenced(lambda pipe: pipe.sadd(done, "g1")) == [1]


async def test_a_lease_that_expired_with_nobody_else_is_taken_again_with_its_token(
    redis: aioredis.Redis, keys: Keys
) -> None:
    lease = Lease(redis, keys, "trainer", "a", ttl_s=0.2)
    await lease.acquire()
    await until_expired(redis, lease)  # Redis was away longer than the ttl; nobody else came
    assert await lease.renew()
    assert lease.token == 1 and lease.lost is None
    await lease.fenced(lambda pipe: pipe.set(f"{keys.namespace}:x", 1))


async def test_a_token_drawn_after_ours_means_the_lease_is_lost_even_if_free(redis: aioredis.Redis, keys: Keys) -> None:
    a, b = Lease(redis, keys, "trainer", "a", ttl_s=0.2), Lease(redis, keys, "trainer", "b", ttl_s=0.2)
    await a.acquire()
    await until_expired(redis, a)
    await b.acquire()  # b came and went while a was frozen: b may have committed a's groups
    await b.release()
    assert not await a.renew()
    with pytest.raises(LeaseLostError):
        a.check()


async def test_renewals_keep_the_lease_past_its_ttl(redis: aioredis.Redis, keys: Keys) -> None:
    lease = Lease(redis, keys, "trainer", "a", ttl_s=1.5)  # renewed every 0.375 s: a miss needs a 1 s stall
    await lease.acquire()
    await lease.start_renewing()
    try:
        await asyncio.sleep(4.0)  # over two ttls: only renewals keep it
        await lease.fenced(lambda pipe: pipe.set(f"{keys.namespace}:x", 1))
    finally:
        await lease.release()
    assert not await redis.exists(lease.key)


async def test_versions_are_drawn_once_and_never_reused(redis: aioredis.Redis, keys: Keys, tmp_path: object) -> None:
    lease = Lease(redis, keys, "trainer", "a", ttl_s=30)
    await lease.acquire()
    publisher = WeightPublisher(redis, keys, FileTransport(str(tmp_path)), fence=lease)
    assert [await publisher.new_version(after=0) for _ in range(3)] == [1, 2, 3]
    assert await publisher.new_version(after=10) == 11  # the trainer's own number is a floor (a lost counter)
    assert await publisher.new_version(after=0) == 12
    other = Lease(redis, keys, "trainer", "b", ttl_s=30)
    await redis.delete(lease.key)  # as if it expired
    await other.acquire()
    with pytest.raises(LeaseLostError):
        await publisher.new_version(after=12)
    assert int(await redis.get(publisher.last_version_key)) == 12


async def test_the_lease_of_a_dead_process_on_this_host_ends_at_once(redis: aioredis.Redis, keys: Keys) -> None:
    import sys

    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()  # its pid is now one of no live process
    gone = Lease(redis, keys, "trainer", "killed", ttl_s=300)
    await gone.acquire()
    await redis.set(gone.key, gone.value.replace(str(os.getpid()).encode(), str(child.pid).encode()), xx=True,
                    keepttl=True)  # fmt: skip
    restarted = Lease(redis, keys, "trainer", "killed", ttl_s=300)
    assert await restarted.acquire() == 2  # no 300 s wait; the dead holder's token is fenced off
