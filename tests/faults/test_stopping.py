"""Every process stops when told and every failure names itself in one line, on real processes and servers.

a wrong Redis url                         feed, produce, train, record: exit 2 within redis.startup_wait_s,
                                          one line naming the url, no traceback (they used to hang, or print
                                          67 lines)
Redis gone, then SIGTERM                  feeder, producer, trainer, recorder each exit within seconds, no
                                          traceback (the trainer ignored SIGTERM for 10 minutes, a producer
                                          for 3)
a feeder whose stream is full, nobody     exits 0 on SIGTERM (it waited for room for ever)
reading it
Redis restarted empty under the run       producer and trainer stop with the data-loss line, no raw
                                          `no such key` / NOGROUP traceback
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from waiting import wait_for

from miles_stream.bus import BusConfig, GroupConsumer, Keys, StreamClient, StreamConsumer, publish
from miles_stream.demo.task import write_task
from miles_stream.errors import DataLossError
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port
from miles_stream.trainer.service import TrainerService

CLI = [sys.executable, "-m", "miles_stream.cli"]
STOPPED_WITHIN_S = 20.0  # the product's bound is aio.STOP_GRACE_S + EXIT_GRACE_S (8 s); the rest is a busy CPU
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def commands(ns: str, tmp_path: Path) -> dict[str, list[str]]:
    model_dir, prompts = write_task(tmp_path)
    common = ["--log-json", f"bus.namespace={ns}", "bus.heartbeat_interval_s=0.5", "bus.heartbeat_ttl_s=5",
              "bus.claim_idle_ms=1500"]  # fmt: skip
    return {
        "feed": [*CLI, "feed", *common, f"feeder.path={prompts}", "feeder.num_epochs=0", "feeder.max_queued=8"],
        "produce": [*CLI, "produce", *common, f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4",
                    "rollout.reward=exact_match", "rollout.sampling.max_new_tokens=4", "rollout.torch_threads=1"],
        "train": [*CLI, "train", *common, f"trainer.model={model_dir}", "buffer.rollout_batch_size=4",
                  "buffer.max_staleness=-1", "buffer.filters=[]", f"trainer.checkpoint_dir={tmp_path / 'ckpt'}",
                  "trainer.checkpoint_every=1", f"trainer.metrics_path={tmp_path / 'metrics.jsonl'}",
                  "trainer.torch_threads=1"],
        "record": [*CLI, "record", *common, "--out", str(tmp_path / "recording")],
    }  # fmt: skip


def start(cmds: dict[str, list[str]], env: dict[str, str], tmp_path: Path) -> dict[str, subprocess.Popen[bytes]]:
    procs = {}
    for name, cmd in cmds.items():
        with (tmp_path / f"{name}.log").open("wb") as err:  # the child keeps its own copy of the descriptor
            procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    return procs


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_wrong_redis_url_is_one_line_from_every_process(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MILES_REDIS_URL", None)
    cmds = {name: [*cmd, "--redis-url", url, "redis.startup_wait_s=1"] for name, cmd in commands("w", tmp_path).items()}
    procs = start(cmds, env, tmp_path)
    try:
        for name, proc in procs.items():
            assert proc.wait(timeout=120) == 2, name
    finally:
        stop_all(procs)
    for name in procs:
        log = (tmp_path / f"{name}.log").read_text()
        last = log.strip().splitlines()[-1]
        assert last.startswith(f"miles-stream {name}: Redis at {url} does not answer"), f"{name}: {log[-2000:]}"
        assert "Traceback" not in log, f"{name}: {log[-3000:]}"


def test_told_to_stop_while_waiting_for_redis_a_process_says_so(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*commands("w", tmp_path)["feed"], "--redis-url", url, "redis.startup_wait_s=600"]
    log = tmp_path / "feed.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: "waiting_for_redis" in log.read_text(), 60, "the feeder to wait for Redis")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOPPED_WITHIN_S) == 2
    finally:
        stop_all({"feed": proc})
    text = log.read_text()
    assert f"stopped while waiting for Redis at {url}" in text.strip().splitlines()[-1] and "Traceback" not in text


@pytest.fixture
def own_server(redis_binary: str, tmp_path: Path) -> EmbeddedRedisConfig:
    """A server of the test's own on a fixed port: it is killed (and restarted) under the processes."""
    return EmbeddedRedisConfig(binary=redis_binary, persistence="none", port=free_port(),
                               data_dir=str(tmp_path / "redis"))  # fmt: skip


def running_pipeline(server: EmbeddedRedis, tmp_path: Path) -> tuple[dict[str, subprocess.Popen[bytes]], str]:
    ns = f"st{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MILES_REDIS_URL": server.url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = start(commands(ns, tmp_path), env, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240, "two trained steps")
    except BaseException:
        stop_all(procs)
        raise
    return procs, ns


@pytest.mark.process_tiers
def test_every_process_stops_on_sigterm_after_redis_is_gone(own_server: EmbeddedRedisConfig, tmp_path: Path) -> None:
    server = EmbeddedRedis(own_server).start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs, _ = running_pipeline(server, tmp_path)
        server.stop()  # gone: every process is now in an outage, retrying
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        took = {}
        for name, proc in procs.items():
            began = time.monotonic()
            proc.wait(timeout=STOPPED_WITHIN_S)
            took[name] = time.monotonic() - began
    finally:
        stop_all(procs)
        server.stop()
    for name, proc in procs.items():
        log = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode in (0, 2), f"{name}: {proc.returncode} after {took}\n{log[-3000:]}"
        assert "Traceback" not in log, f"{name}: {log[-3000:]}"
        if proc.returncode == 2:  # could not finish cleanly: one line says why
            assert log.strip().splitlines()[-1].startswith(f"miles-stream {name}: "), f"{name}: {log[-2000:]}"


def test_a_feeder_with_a_full_stream_and_no_reader_stops_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    ns = f"ff{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MILES_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1"}
    cmd = [*commands(ns, tmp_path)["feed"], "bus.max_backlog_entries=4", "feeder.max_queued=4"]
    log = tmp_path / "feed.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        with redis.Redis.from_url(redis_url) as client:
            wait_for(lambda: client.xlen(f"{ns}:prompts") >= 4, 120, "the prompt stream to fill")
        wait_for(lambda: "backpressure_engaged" in log.read_text(), 60, "the feeder to wait for room")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOPPED_WITHIN_S) == 0, log.read_text()[-2000:]
    finally:
        stop_all({"feed": proc})
    assert "feeder_stopped" in log.read_text()


def test_redis_restarted_empty_stops_the_run_in_one_line(own_server: EmbeddedRedisConfig, tmp_path: Path) -> None:
    server = EmbeddedRedis(own_server).start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs, _ = running_pipeline(server, tmp_path)
        server.stop()
        server = EmbeddedRedis(own_server).start()  # the same port, nothing in it: a restart without persistence
        for proc in procs.values():
            proc.wait(timeout=120)  # each notices within a heartbeat or its next call
    finally:
        stop_all(procs)
        server.stop()
    for name, proc in procs.items():
        log = (tmp_path / f"{name}.log").read_text()
        if name == "record":  # an observer: it is not told of the run (no run identity); it may go on or stop
            assert "Traceback" not in log, log[-3000:]
            continue
        assert proc.returncode == 2, f"{name}: {proc.returncode}\n{log[-3000:]}"
        assert "Redis lost this run's data" in log or "no longer has a consumer group" in log, f"{name}: {log[-3000:]}"
        assert "Traceback" not in log, f"{name}: {log[-3000:]}"


async def test_a_stream_gone_under_a_consumer_that_trims_is_a_data_loss(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    """The producer's housekeeping trim met a Redis restarted empty: XINFO answers `no such key`, which was
    raised raw (a traceback) where every other path said the run's data was lost."""
    stream = StreamConsumer(redis, blocking, stream=keys.prompts, group="producers", consumer="p",
                            dead_stream=keys.dead, config=bus_config)  # fmt: skip
    await stream.start()
    await publish(redis, keys.prompts, b"x", maxlen=100)
    (entry,) = await stream.read(1)
    await redis.delete(keys.prompts)  # what a restart without persistence leaves
    with pytest.raises(DataLossError, match="no longer has a consumer group"):
        await stream.ack([entry.id])  # acks, then trims


async def test_the_trainers_keep_alive_meeting_a_lost_group_is_a_data_loss(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig
) -> None:
    """The trainer's keep-alive touched its held entries in a Redis restarted empty: NOGROUP was raised raw
    over the clean stop (a traceback) instead of the data-loss line."""
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                            dead_stream=keys.dead, config=bus_config)  # fmt: skip
    consumer = GroupConsumer(stream, keys)
    await consumer.start()
    await publish(redis, keys.trajectories, b"x", maxlen=100)
    await stream.read(1)  # held: the keep-alive touches it
    await redis.delete(keys.trajectories)
    service = TrainerService.__new__(TrainerService)  # only its keep-alive loop, on the real consumer
    service.buffer = type("Buffer", (), {"consumer": consumer})()  # type: ignore[assignment]
    with pytest.raises(DataLossError, match="no longer has a consumer group"):
        await asyncio.wait_for(service._keep_alive(), 30)


async def test_a_wrong_password_is_refused_at_once_not_waited_for(redis: aioredis.Redis, redis_url: str) -> None:
    """redis-py's AuthenticationError is a subclass of its ConnectionError: it was retried as a blip for the
    whole startup wait, then reported as a server that does not answer."""
    from miles_stream.bus import RedisConfig, connect, wait_until_reachable
    from miles_stream.errors import RedisUnavailableError

    user = f"u{uuid.uuid4().hex[:8]}"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">right", "~*", "+@all")
    try:
        config = RedisConfig(url=redis_url.replace("redis://", f"redis://{user}:wrong@"), startup_wait_s=60)
        client = connect(config)
        began = time.monotonic()
        try:
            with pytest.raises(RedisUnavailableError, match="refused this process"):
                await wait_until_reachable(client, config)
        finally:
            await client.aclose()
        assert time.monotonic() - began < 30  # not the 60 s startup wait
    finally:
        await redis.execute_command("ACL", "DELUSER", user)
