"""A trainer process while Redis is away (stopped cleanly, AOF on, started again on the same port):

- an outage of several seconds while the trainer waits for groups: it waits it out (reads, commits, weight
  announcements are retried), then trains what comes after, every group once and committed;
- SIGTERM during an outage: the trainer gives up its retries after their grace period, saves a checkpoint
  naming the groups it trained but could not commit, exits; once Redis is back, `--resume` commits them
  without training them again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis_groups import done_total, publish_groups
from test_trainer_process import groups, metrics, train_cmd, trained_groups

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig())


def start_redis(tmp_path: Path, binary: str, port: int) -> EmbeddedRedis:
    config = EmbeddedRedisConfig(binary=binary, port=port, data_dir=str(tmp_path / "data"), persistence="aof")
    return EmbeddedRedis(config).start()


def wait_for(predicate: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


@pytest.mark.process_tiers
def test_the_trainer_waits_out_an_outage_and_trains_every_group_once(
    tmp_path: Path, redis_binary: str, model_dir: Path
) -> None:
    port, ns = free_port(), "outage"
    server = start_redis(tmp_path, redis_binary, port)
    asyncio.run(publish_groups(server.url, ns, groups(0, 8)))  # two steps' worth: then it waits on a read
    time.sleep(1.2)  # past one AOF fsync
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": server.url}
    run_dir = tmp_path / "run"
    with open(tmp_path / "trainer.log", "wb") as out:
        trainer = subprocess.Popen([*train_cmd(ns, model_dir, run_dir, "trainer.max_steps=6")], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 2, 120)
        time.sleep(0.5)  # the step-2 checkpoint commits; then it blocks reading for more
        server.stop()  # SIGTERM: the AOF is written out
        time.sleep(5.0)  # longer than any default retry would wait
        server = start_redis(tmp_path, redis_binary, port)
        asyncio.run(publish_groups(server.url, ns, groups(8, 16)))
        code = trainer.wait(timeout=120)
        log = (tmp_path / "trainer.log").read_text()
        assert code == 0, log[-3000:]
        steps = trained_groups(log)
        trained = [g for ids in steps.values() for g in ids]
        assert len(steps) == 6 and len(trained) == len(set(trained)) == 24
        assert "redis_retry" in log  # it did ride something out
        with redis.Redis.from_url(server.url) as client:
            assert done_total(client, f"{ns}:done:trainer") == 24
            assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
            # the last version is announced (publication runs in the background: one that waited behind a
            # publication stuck in the outage may have been skipped for a newer one)
            latest = client.xrevrange(f"{ns}:weights", count=1)
            assert int(latest[0][1][b"version"]) == 6
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        server.stop()


@pytest.mark.process_tiers
def test_sigterm_during_an_outage_checkpoints_and_resume_commits(
    tmp_path: Path, redis_binary: str, model_dir: Path
) -> None:
    port, ns = free_port(), "outstop"
    server = start_redis(tmp_path, redis_binary, port)
    asyncio.run(publish_groups(server.url, ns, groups(0, 16)))
    time.sleep(1.2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": server.url}
    run_dir = tmp_path / "run"
    # commits only at checkpoints (every 2 steps): one step in, a group set is trained and not yet committed
    with open(tmp_path / "first.log", "wb") as out:
        trainer = subprocess.Popen(train_cmd(ns, model_dir, run_dir, "trainer.checkpoint_every=100"), env=env,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 1, 120)
        server.stop()
        time.sleep(0.5)
        started = time.monotonic()
        trainer.send_signal(signal.SIGTERM)
        code = trainer.wait(timeout=60)
        log = (tmp_path / "first.log").read_text()
        assert code == 0 and time.monotonic() - started < 30, log[-3000:]  # 10 s of grace, then out
        assert "stopped_during_redis_outage" in log
        first = [g for ids in trained_groups(log).values() for g in ids]
        assert first
        server = start_redis(tmp_path, redis_binary, port)
        with redis.Redis.from_url(server.url) as client:
            assert done_total(client, f"{ns}:done:trainer") == 0  # nothing reached Redis
        resumed = subprocess.run([*train_cmd(ns, model_dir, run_dir, "trainer.max_steps=4"), "--resume"],
                                 env={**env, "MILES_REDIS_URL": server.url}, capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        second = [g for ids in trained_groups(resumed.stderr).values() for g in ids]
        assert not set(first) & set(second)  # the checkpoint's groups were committed, not trained again
        with redis.Redis.from_url(server.url) as client:
            assert done_total(client, f"{ns}:done:trainer") == len(first) + len(second) == 16
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        server.stop()
