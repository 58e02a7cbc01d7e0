"""Faults injected into real processes on a real Redis, each ending with an accounting check: every prompt
fed becomes exactly one committed group, or is counted as dead-lettered with a reason.

    kill -9 of a producer while it generates     its claimed prompts are reclaimed by another producer
    a producer that hangs and never acks          (SIGSTOP) the same, and when it wakes it publishes nothing twice
    a connection cut during a blocking read       the consumer reconnects; nothing lost, nothing read twice

The other faults of the reliability issue live beside the code they exercise: kill -9 of a trainer between its
step and its ack (tests/integration/test_trainer_process.py), Redis stopped or crashed and restarted under the
pipeline (test_redis_faults.py), bad input (tests/unit/test_codec.py, test_config.py, test_rewards.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis
from redis_groups import done_total

from miles_stream.bus import BusConfig, GroupConsumer, GroupPublisher, Keys, RedisConfig, StreamConsumer, connect
from miles_stream.bus.dataplane import open_stream_client
from miles_stream.demo.task import write_task
from miles_stream.testing.synthetic import synthetic_group

CLI = [sys.executable, "-m", "miles_stream.cli"]
PROMPTS = 100  # the demo task's dataset
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def bus_args(ns: str) -> list[str]:
    """Fast reclaim, so a dead producer's prompts move on within seconds."""
    return [f"bus.namespace={ns}", "bus.claim_idle_ms=1500", "bus.claim_interval_s=0.5", "--log-json"]


def producer(
    ns: str, name: str, model_dir: Path, env: dict[str, str], log: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    args = [*extra, f"rollout.model={model_dir}", f"rollout.producer_id={name}", "rollout.n_samples_per_prompt=4",
            "rollout.reward=exact_match", "rollout.sampling.max_new_tokens=40", "rollout.sampling.ignore_eos=true",
            "rollout.max_inflight_prompts=4", "rollout.torch_threads=1"]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen([*CLI, "produce", *bus_args(ns), *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pending(client: redis.Redis, stream: str, group: str) -> int:
    groups = client.xinfo_groups(stream) if client.exists(stream) else []
    return sum(int(g["pending"]) for g in groups if g["name"] in (group, group.encode()))


async def commit_all(url: str, ns: str, want: int, within_s: float = 180) -> tuple[list[str], int]:
    """Read the trajectory stream as the trainer's consumer group would and commit every group: returns the
    prompt keys of the groups committed, and how many deliveries were dropped as duplicates."""
    keys, bus = Keys(ns), BusConfig(namespace=ns, block_ms=200)
    redis_client, blocking = connect(RedisConfig(url=url)), open_stream_client(RedisConfig(url=url), block_ms=200)
    stream = StreamConsumer(redis_client, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                            dead_stream=keys.dead, config=bus)  # fmt: skip
    consumer = GroupConsumer(stream, keys)
    await consumer.start()
    got: list[str] = []
    deadline = time.monotonic() + within_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            items = await consumer.read(32)
            await consumer.commit(items)
            got += [r.group.prompt_key for r in items]
    finally:
        await blocking.aclose()
        await redis_client.aclose()
    return got, consumer.counters.duplicates


def feed(ns: str, prompts: Path, env: dict[str, str], extra: Sequence[str] = ()) -> None:
    fed = subprocess.run([*CLI, "feed", *bus_args(ns), *extra, f"feeder.path={prompts}", "feeder.num_epochs=1"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert fed.returncode == 0, fed.stderr[-2000:]


def account(keys: list[str], client: redis.Redis, ns: str) -> None:
    """Every prompt exactly once, nothing pending, nothing dead-lettered (no input here was bad)."""
    assert sorted(keys, key=int) == [str(i) for i in range(PROMPTS)]
    assert done_total(client, f"{ns}:done:trainer") == PROMPTS
    assert pending(client, f"{ns}:prompts", "producers") == 0
    assert pending(client, f"{ns}:trajectories", "trainer") == 0
    assert not client.exists(f"{ns}:dead")


@pytest.mark.parametrize("fault", ["kill -9", "hang"])
@pytest.mark.process_tiers
def test_a_producer_lost_mid_generation_leaves_its_prompts_to_another(
    redis_url: str, tmp_path: Path, fault: str
) -> None:
    ns = f"f{uuid.uuid4().hex[:8]}"
    model_dir, prompts = write_task(tmp_path)
    env = {**os.environ, "MILES_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1"}
    feed(ns, prompts, env)
    with redis.Redis.from_url(redis_url) as client:
        first = producer(ns, "first", model_dir, env, tmp_path / "first.log")
        wait_for(lambda: pending(client, f"{ns}:prompts", "producers") >= 2, 120, "the first producer's claims")
        held = pending(client, f"{ns}:prompts", "producers")
        first.send_signal(signal.SIGKILL if fault == "kill -9" else signal.SIGSTOP)
        second = producer(ns, "second", model_dir, env, tmp_path / "second.log")
        try:
            keys, _ = asyncio.run(commit_all(redis_url, ns, PROMPTS))
            if fault == "hang":  # it wakes up: what it held was taken over; it must not publish it again
                first.send_signal(signal.SIGCONT)
                time.sleep(3.0)
                first.send_signal(signal.SIGTERM)
                assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()[-3000:]
                late, _ = asyncio.run(commit_all(redis_url, ns, 1, within_s=3))
                assert late == [], late  # nothing new reached the trainer
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0, (tmp_path / "second.log").read_text()[-3000:]
            if first.poll() is None:
                first.kill()
                first.wait()
        account(keys, client, ns)
    assert held >= 2
    log = (tmp_path / "second.log").read_text()
    assert "entries_reclaimed" in log  # the second producer took over what the first held


def test_a_connection_cut_during_a_blocking_read_loses_nothing(redis_url: str) -> None:
    ns = f"f{uuid.uuid4().hex[:8]}"
    keys, bus = Keys(ns), BusConfig(namespace=ns, block_ms=5000)

    async def run() -> tuple[list[str], int]:
        admin = connect(RedisConfig(url=redis_url))
        data = open_stream_client(RedisConfig(url=redis_url))
        publisher = GroupPublisher(data, keys.trajectories, bus)
        rng = np.random.default_rng(0)
        made = [synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50, group_id=f"g{i}",
                                prompt_key=str(i)) for i in range(20)]  # fmt: skip
        reader = asyncio.create_task(commit_all(redis_url, ns, 20, within_s=60))
        for g in made[:10]:
            await publisher.publish(g)
        await asyncio.sleep(1.0)  # the reader drains them and blocks for more (block_ms 200 in commit_all)
        cut = 0
        for _ in range(50):  # cut every blocking read of the trainer group while it waits
            clients = await admin.client_list()
            for c in clients:
                if c.get("cmd") in ("xreadgroup", "XREADGROUP") and c.get("flags", "").find("b") >= 0:
                    await admin.client_kill_filter(_id=c["id"])
                    cut += 1
            if cut:
                break
            await asyncio.sleep(0.02)
        for g in made[10:]:
            await publisher.publish(g)
        got, _ = await reader
        await data.aclose()
        await admin.aclose()
        return got, cut

    got, cut = asyncio.run(run())
    assert cut >= 1  # a blocked read was cut
    assert sorted(got, key=int) == [str(i) for i in range(20)]  # all read, each once
    with redis.Redis.from_url(redis_url) as client:
        assert pending(client, f"{ns}:trajectories", "trainer") == 0
