"""The whole pipeline on CPU, as separate processes: a feeder, a producer, a trainer, and a second producer
attached while the run goes. Reward rises; every group is trained at most once or counted as dropped;
staleness stays within its bound; nothing is left pending. Then the demo command itself, briefly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis_groups import done_total
from redis_tiers import tier_binary
from transformers import AutoModelForCausalLM

from miles_stream.demo.task import write_task
from miles_stream.redis_cluster import LocalCluster
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig

CLI = [sys.executable, "-m", "miles_stream.cli"]
CONFIG = Path(__file__).parents[2] / "configs" / "demo.yaml"
pytestmark = pytest.mark.integration


def metrics(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def bus_server(where: str) -> Iterator[tuple[str, str, type[sync_redis.Redis] | type[sync_redis.RedisCluster]]]:
    """(url, namespace, client class): one embedded server, or a 3-primary Valkey cluster (its namespace a hash
    tag, so the run's keys share one slot)."""
    if where == "cluster":
        with LocalCluster(tier_binary("valkey")) as cluster:
            yield cluster.url, "{demo}", sync_redis.RedisCluster
    else:
        with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as server:
            yield server.url, "demo", sync_redis.Redis


@pytest.mark.timeout(400)
@pytest.mark.parametrize("where", ["server", pytest.param("cluster", marks=pytest.mark.slow)])
def test_feeder_producers_and_trainer_learn_with_nothing_lost(tmp_path: Path, where: str) -> None:
    model_dir, prompts = write_task(tmp_path)
    steps, max_staleness = 60, 2  # the demo recipe reaches ~0.9 in 60-100 steps; then most groups are filtered
    with bus_server(where) as (url, ns, client_class):
        overrides = [f"rollout.model={model_dir}", f"trainer.model={model_dir}", f"feeder.path={prompts}",
                     f"trainer.metrics_path={tmp_path / 'metrics.jsonl'}", f"trainer.max_steps={steps}",
                     f"buffer.max_staleness={max_staleness}", f"bus.namespace={ns}"]  # fmt: skip
        env = {**os.environ, "MILES_REDIS_URL": url, "HF_HUB_OFFLINE": "1"}

        def start(command: str, name: str, *extra: str) -> subprocess.Popen[bytes]:
            args = ["--config", str(CONFIG), "--log-json", "--log-level", "debug", *overrides, *extra]
            with open(tmp_path / f"{name}.log", "wb") as log:
                return subprocess.Popen([*CLI, command, *args], env=env, stdout=log, stderr=subprocess.STDOUT)

        feeder = start("feed", "feeder")
        first = start("produce", "producer-a", "rollout.producer_id=a")
        trainer = start("train", "trainer")
        deadline = time.monotonic() + 300
        while len(metrics(tmp_path / "metrics.jsonl")) < 30 and time.monotonic() < deadline:
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
            time.sleep(0.2)
        # attached while the run goes; it aborts and recycles what it generates at each weight update
        late = start("produce", "producer-b", "rollout.producer_id=b", "rollout.on_update=recycle")
        assert trainer.wait(timeout=300) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        for proc in (late, first, feeder):
            proc.send_signal(signal.SIGTERM)
        for proc in (late, first, feeder):
            assert proc.wait(timeout=60) == 0

        with client_class.from_url(url.split("?")[0]) as client:
            trajectories = client.xinfo_groups(f"{ns}:trajectories")
            prompts_pending = client.xinfo_groups(f"{ns}:prompts")[0]["pending"]
            partials = client.xinfo_groups(f"{ns}:partials") if client.exists(f"{ns}:partials") else []
            done = {x.decode() for x in client.zrange(f"{ns}:done:trainer", 0, -1)}  # those not yet forgotten
            done_count = done_total(client, f"{ns}:done:trainer")
    assert prompts_pending == 0  # both producers handed back what they had in flight
    assert all(g["pending"] == 0 for g in partials)  # and every partial claimed was finished or handed back

    rows = metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    early = sum(float(r["rollout_reward"]) for r in rows[:20]) / 20  # type: ignore[arg-type]
    late_reward = sum(float(r["rollout_reward"]) for r in rows[-20:]) / 20  # type: ignore[arg-type]
    assert late_reward > early + 0.05, (early, late_reward)
    assert max(int(r["staleness_max"]) for r in rows) <= max_staleness  # type: ignore[call-overload]

    trained: list[str] = []
    stopped = None
    for line in (tmp_path / "trainer.log").read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "batch_groups":
                trained += event["group_ids"]
            if event.get("event") == "trainer_stopped":
                stopped = event
    assert stopped is not None
    assert len(trained) == len(set(trained)) == steps * 16  # at most once each
    assert done <= set(trained) and done_count == len(trained)  # and committed
    dropped = sum(stopped["filtered"].values()) + stopped["stale_dropped"] + stopped["recycled"]
    read_total = rows[-1]["rollout_groups"]
    # every group read was trained, or counted as dropped; the rest were read into the buffer and left pending
    left_in_buffer = read_total - len(trained) - dropped  # type: ignore[operator]
    pending = trajectories[0]["pending"]
    assert left_in_buffer >= 0 and pending == left_in_buffer
    by_producer = {}
    for line in (tmp_path / "producer-b.log").read_text().splitlines():
        if '"producer_stopped"' in line:
            by_producer = json.loads(line)
    assert by_producer.get("groups", 0) > 0  # the late producer contributed
    admitted = [json.loads(x) for x in (tmp_path / "producer-a.log").read_text().splitlines() if x.startswith("{")]
    waits = [e for e in admitted if e.get("event") == "admission_waiting"]
    for e in waits:  # the trainers' budget, when it binds: (s + 1 - versions behind) x at least a batch
        behind = max(int(e["trainer_version"]) - int(e["version"]), 0)
        assert int(e["limit"]) >= (max_staleness + 1 - behind) * 16, e


@pytest.mark.timeout(200)
def test_demo_command_runs_and_writes_its_outputs(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([*CLI, "demo", "--work-dir", str(tmp_path), "--steps", "20", "--no-live"], env=env,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "demo summary" in run.stdout
    assert len(metrics(tmp_path / "metrics.jsonl")) == 20
    assert (tmp_path / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(metrics(tmp_path / "eval.jsonl")) >= 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "final-model")


@pytest.mark.timeout(200)
def test_demo_stopped_with_sigterm_stops_its_processes_and_summarises(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    demo = subprocess.Popen([*CLI, "demo", "--work-dir", str(tmp_path), "--no-live"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(metrics(tmp_path / "metrics.jsonl")) < 5 and time.monotonic() < deadline and demo.poll() is None:
        time.sleep(0.2)
    demo.send_signal(signal.SIGTERM)
    out, err = demo.communicate(timeout=90)
    assert demo.returncode == 130, out[-2000:] + err[-2000:]
    assert "demo summary" in out
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout == "", left.stdout  # the feeder, the producer and the trainer are gone
