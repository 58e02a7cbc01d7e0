"""Record and replay: the recorder writes every entry to files and acks only what is on disk; a replay
publishes the same bytes into another namespace; training on a recording twice with the same seed gives
the same losses and the same weights, bit for bit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis as sync_redis
from safetensors.torch import load_file

from miles_stream.bus import BusConfig, GroupPublisher, Keys, RedisConfig
from miles_stream.bus.dataplane import open_stream_client
from miles_stream.bus.keys import partition_keys
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.record import read_recording, recording_files

sys.path.insert(0, str(Path(__file__).parent))
from redis_groups import publish_groups
from test_trainer_process import groups

CLI = [sys.executable, "-m", "miles_stream.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig())


@pytest.mark.process_tiers
def test_record_then_replay_then_train_on_the_recording_twice(redis_url: str, model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MILES_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1"}
    ns, other = f"rec{uuid.uuid4().hex[:8]}", f"rep{uuid.uuid4().hex[:8]}"
    asyncio.run(publish_groups(redis_url, ns, groups(0, 12)))
    out = tmp_path / "rec"
    recorder = subprocess.Popen([*CLI, "record", "--out", str(out), f"bus.namespace={ns}", "bus.block_ms=100"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    with sync_redis.Redis.from_url(redis_url) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = {g["name"].decode(): g for g in client.xinfo_groups(f"{ns}:trajectories")}
            last_id = client.xrevrange(f"{ns}:trajectories", count=1)[0][0]
            rec = info.get("recorder")
            if rec and rec["pending"] == 0 and rec["last-delivered-id"] == last_id:
                break
            time.sleep(0.1)
        recorder.send_signal(signal.SIGTERM)
        _, err = recorder.communicate(timeout=30)
        assert recorder.returncode == 0, err
        original = [f[b"d"] for _, f in client.xrange(f"{ns}:trajectories")]
    files = recording_files([out])
    assert files and not any(f.name.endswith(".part") for f in files)
    assert [r for f in files for r in read_recording(f)] == original  # every entry, byte for byte

    replayed = subprocess.run([*CLI, "replay", str(out), "--rate", "200", f"bus.namespace={other}"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 12 groups" in replayed.stdout
    with sync_redis.Redis.from_url(redis_url) as client:
        assert [f[b"d"] for _, f in client.xrange(f"{other}:trajectories")] == original

    runs = []
    for i in range(2):
        run_dir = tmp_path / f"train{i}"
        cmd = [
            *CLI, "train", "--replay", str(out), f"trainer.model={model_dir}", "buffer.rollout_batch_size=4",
            "buffer.max_staleness=-1", "buffer.filters=[]", "trainer.lr=1e-3", "trainer.recompute_old_logprobs=false",
            f"trainer.metrics_path={run_dir / 'm.jsonl'}", f"trainer.export_dir={run_dir / 'export'}",
        ]  # fmt: skip
        no_redis = {**env, "MILES_REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing listens there: none is needed
        done = subprocess.run(cmd, env=no_redis, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(x) for x in (run_dir / "m.jsonl").read_text().splitlines()]
        runs.append((rows, load_file(run_dir / "export" / "model.safetensors")))
    (rows_a, weights_a), (rows_b, weights_b) = runs
    assert [r["step"] for r in rows_a] == [1, 2, 3]  # 12 groups, 4 a step, then the recording ends
    keys = ("loss", "pg_loss", "grad_norm", "entropy", "ppo_kl", "tokens")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    assert all(weights_a[k].equal(weights_b[k]) for k in weights_a)


@pytest.mark.process_tiers
def test_a_partitioned_run_is_recorded_and_replayed_as_processes(redis_url: str, tmp_path: Path) -> None:
    """`miles-stream record` with bus.partitions=2 records both partitions' streams (files of their own), and
    `miles-stream replay` publishes the recording into another run's 2 partitions."""
    env = {**os.environ, "MILES_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1"}
    ns, other = f"rec{uuid.uuid4().hex[:8]}", f"rep{uuid.uuid4().hex[:8]}"
    parts = partition_keys(ns, 2)

    async def publish() -> None:
        data = open_stream_client(RedisConfig(url=redis_url))
        for p, k in enumerate(parts):
            publisher = GroupPublisher(data, k.trajectories, BusConfig(namespace=ns))
            for g in groups(6 * p, 6):
                await publisher.publish(g)
        await data.aclose()

    asyncio.run(publish())
    out = tmp_path / "rec"
    recorder = subprocess.Popen([*CLI, "record", "--out", str(out), f"bus.namespace={ns}", "bus.partitions=2",
                                 "bus.block_ms=100"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    with sync_redis.Redis.from_url(redis_url) as client:

        def recorded(k: Keys) -> bool:
            info = {g["name"].decode(): g for g in client.xinfo_groups(k.trajectories)}
            rec = info.get("recorder")
            last = client.xrevrange(k.trajectories, count=1)[0][0]
            return bool(rec) and rec["pending"] == 0 and rec["last-delivered-id"] == last

        deadline = time.monotonic() + 60
        while not all(recorded(k) for k in parts):
            assert time.monotonic() < deadline and recorder.poll() is None, "the recorder did not record both"
            time.sleep(0.1)
        recorder.send_signal(signal.SIGTERM)
        _, err = recorder.communicate(timeout=30)
        assert recorder.returncode == 0, err
        original = [[f[b"d"] for _, f in client.xrange(k.trajectories)] for k in parts]
    files = recording_files([out])
    for k, want in zip(parts, original, strict=True):
        assert [r for f in files if f.name.startswith(f"{k.namespace}-") for r in read_recording(f)] == want

    replayed = subprocess.run([*CLI, "replay", str(out), f"bus.namespace={other}", "bus.partitions=2"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 12 groups into the 2 partitions" in replayed.stdout
    with sync_redis.Redis.from_url(redis_url) as client:
        got = [f[b"d"] for k in partition_keys(other, 2) for _, f in client.xrange(k.trajectories)]
    assert sorted(got) == sorted(original[0] + original[1])
