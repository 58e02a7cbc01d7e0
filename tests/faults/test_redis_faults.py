"""Redis stopped and started again under a running producer process and a committing consumer, with AOF on
(appendfsync everysec, the default), then the accounting: every prompt committed, and what a crash cost.

    SIGTERM (a clean restart)   Redis writes its AOF out: nothing is lost (a retried XADD may still add a copy)
    SIGKILL (a crash)           up to the last second of writes may be gone. A producer publishes a group before
                                it acks the prompt, and the AOF keeps commands in order, so a lost group means
                                a lost ack: the prompt is pending again, reclaimed and generated again. A lost
                                ack alone gives a second copy of a group, which the trainer drops by group id.

Either way every prompt is committed exactly once (the consumer here starts after the restart; a trainer that
loses its own commits in a crash is the kill -9 + --resume case, tests/integration/test_trainer_process.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis_groups import done_total

from miles_stream.bus import BusConfig, GroupConsumer, Keys, RedisConfig, RetryPolicy, StreamConsumer, connect
from miles_stream.bus.dataplane import open_stream_client
from miles_stream.demo.task import write_task
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port

CLI = [sys.executable, "-m", "miles_stream.cli"]
PROMPTS = 100
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def consume(url: str, ns: str, stop_after: float) -> tuple[list[str], int]:
    """Commit every group as it arrives, riding out the outage, until every prompt's group came and then
    nothing new for `stop_after` s (a second copy would arrive in that time), or 120 s went by."""
    keys, bus = Keys(ns), BusConfig(namespace=ns, block_ms=200)
    config = RedisConfig(url=url, connect_timeout_s=0.5)
    control, blocking = connect(config), open_stream_client(config, block_ms=bus.block_ms)
    stream = StreamConsumer(control, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                            dead_stream=keys.dead, config=bus)  # fmt: skip
    consumer = GroupConsumer(stream, keys, retry=RetryPolicy(attempts=0, max_delay_s=0.2))
    await RetryPolicy(attempts=0, max_delay_s=0.2).run(consumer.start)
    got: list[str] = []
    last = started = time.monotonic()
    try:
        while time.monotonic() - started < 120 and (len(set(got)) < PROMPTS or time.monotonic() - last < stop_after):
            items = await consumer.read(32)
            if items:
                await RetryPolicy(attempts=0, max_delay_s=0.2).run(lambda batch=items: consumer.commit(batch))
                got += [r.group.prompt_key for r in items]
                last = time.monotonic()
    finally:
        await blocking.aclose()
        await control.aclose()
    return got, consumer.counters.duplicates


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["clean", "crash"])
def test_the_pipeline_rides_out_a_redis_restart(tmp_path: Path, redis_binary: str, how: signal.Signals) -> None:
    config = EmbeddedRedisConfig(binary=redis_binary, port=free_port(), data_dir=str(tmp_path / "data"),
                                 persistence="aof")  # fmt: skip
    server = EmbeddedRedis(config).start()
    ns = "rr"
    model_dir, prompts = write_task(tmp_path)
    env = {**os.environ, "MILES_REDIS_URL": server.url, "HF_HUB_OFFLINE": "1"}
    bus = [f"bus.namespace={ns}", "bus.claim_idle_ms=2000", "bus.claim_interval_s=0.5", "--log-json"]
    fed = subprocess.run([*CLI, "feed", *bus, f"feeder.path={prompts}", "feeder.num_epochs=1"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert fed.returncode == 0, fed.stderr[-2000:]
    time.sleep(1.5)  # past one fsync: the prompts are on disk before anything can be lost
    rollout = [f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4", "rollout.reward=exact_match",
               "rollout.sampling.max_new_tokens=40", "rollout.sampling.ignore_eos=true", "rollout.torch_threads=1",
               "rollout.max_inflight_prompts=4"]  # fmt: skip
    with open(tmp_path / "producer.log", "wb") as log:
        producer = subprocess.Popen([*CLI, "produce", *bus, *rollout], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with redis.Redis.from_url(server.url) as client:
            deadline = time.monotonic() + 120
            while client.xlen(f"{ns}:trajectories") < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert server.pid is not None
        os.kill(server.pid, how)  # mid-run: the producer is generating and publishing
        time.sleep(0.2)
        server.stop()  # reaps it (after SIGKILL there is nothing left to flush)
        time.sleep(2.0)
        server = EmbeddedRedis(config).start()  # same port, same AOF
        keys, _ = asyncio.run(consume(server.url, ns, stop_after=3.0))  # second copies dropped by group id
    finally:
        producer.send_signal(signal.SIGTERM)
        code = producer.wait(timeout=60)
    try:
        assert code == 0, (tmp_path / "producer.log").read_text()[-3000:]
        assert sorted(keys, key=int) == [str(i) for i in range(PROMPTS)]  # each prompt committed exactly once
        with redis.Redis.from_url(server.url) as client:
            assert done_total(client, f"{ns}:done:trainer") == PROMPTS
            assert not client.exists(f"{ns}:dead")
            assert int(client.xinfo_groups(f"{ns}:prompts")[0]["pending"]) == 0
        # Second copies happen even on a clean restart: an XADD whose reply was lost as the
        # server went down is retried (at least once on the stream); the group id drops the copy, as above.
    finally:
        server.stop()
