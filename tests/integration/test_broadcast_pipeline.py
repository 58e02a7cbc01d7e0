"""Feeder, producer and trainer processes with the broadcast weight transport (gloo on CPU standing in for NCCL):
the producer's engine receives every version over the weight group and its groups carry those versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miles_stream.demo.task import write_task
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port

CLI = [sys.executable, "-m", "miles_stream.cli"]
CONFIG = Path(__file__).parents[2] / "configs" / "demo.yaml"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def events(path: Path, name: str) -> list[dict[str, object]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == name]


def updated(tmp_path: Path) -> list[object]:
    return [e["version"] for e in events(tmp_path / "produce.log", "weights_updated")]


def test_a_producer_follows_the_trainer_over_the_weight_group(tmp_path: Path) -> None:
    model_dir, prompts = write_task(tmp_path)
    values = {"master_port": free_port(), "backend": "gloo", "device": "cpu", "dtype": "float32", "timeout_s": 60}
    group = [f"weights_group.{k}={v}" for k, v in values.items()]
    overrides = [f"rollout.model={model_dir}", f"trainer.model={model_dir}", f"feeder.path={prompts}",
                 "trainer.max_steps=5", "trainer.transport=broadcast", "rollout.weights_rank=1",
                 f"trainer.metrics_path={tmp_path / 'metrics.jsonl'}", *group]  # fmt: skip
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as server:
        env = {**os.environ, "MILES_REDIS_URL": server.url, "HF_HUB_OFFLINE": "1"}

        def start(command: str) -> subprocess.Popen[bytes]:
            args = ["--config", str(CONFIG), "--log-json", *overrides]
            with open(tmp_path / f"{command}.log", "wb") as log:
                return subprocess.Popen([*CLI, command, *args], env=env, stdout=log, stderr=subprocess.STDOUT)

        feeder, producer, trainer = start("feed"), start("produce"), start("train")
        try:
            assert trainer.wait(timeout=180) == 0, (tmp_path / "train.log").read_text()[-3000:]
            deadline = time.monotonic() + 30  # the last version reaches the producer after the trainer is done
            while time.monotonic() < deadline and 5 not in updated(tmp_path):
                time.sleep(0.2)
        finally:
            for proc in (producer, feeder):
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(timeout=60) for proc in (producer, feeder)]
    assert codes == [0, 0], (tmp_path / "produce.log").read_text()[-3000:]
    versions = updated(tmp_path)
    assert versions and versions[-1] == 5 and versions == sorted(versions)  # every announced one it saw, in order
    published = [e["version"] for e in events(tmp_path / "train.log", "weights_published")]
    skipped = [e["version"] for e in events(tmp_path / "train.log", "weights_version_skipped")]
    # publication runs in the background: a version that waited behind one in flight may be replaced by a newer
    assert published[-1] == 5 and published == sorted(set(published))
    assert sorted(published + skipped) == [1, 2, 3, 4, 5]
    assert all(e.get("transport") == "broadcast" for e in events(tmp_path / "train.log", "weights_published"))
