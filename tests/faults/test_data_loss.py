"""Redis losing a run's data under real processes (FLUSHALL, as a restart without persistence does): detected,
reported, nothing skipped silently; then the deliberate choice to go on, with the accounting of the new run
exact.

    feeder, producer, trainer running      FLUSHALL: each stops with "Redis lost this run's data" (or the
                                           NOGROUP it met), exit 2, no traceback; the feeder does not report
                                           the dataset published and exit 0 (it did, with 164 of 500 there)
    train --resume after the loss           refused: its checkpoint belongs to the lost run
    reset-run, then train --resume          continues the checkpoint into the new run; every group of the new
                                           run is trained exactly once
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
from redis_groups import done_total, publish_groups
from waiting import wait_for

from miles_stream.demo.task import write_task
from miles_stream.schema import TrajectoryGroup
from miles_stream.testing.synthetic import synthetic_group

CLI = [sys.executable, "-m", "miles_stream.cli"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def groups(start: int, count: int) -> list[TrajectoryGroup]:
    out = []
    for i in range(start, start + count):
        g = synthetic_group(np.random.default_rng(i), n_samples=4, prompt_len=4, response_len=3, vocab=16,
                            group_id=f"new{i}", prompt_key=str(i))  # fmt: skip
        out.append(replace(g, samples=tuple(replace(s, reward=float(k % 2)) for k, s in enumerate(g.samples))))
    return out


def test_a_flushed_redis_stops_every_process_and_going_on_is_a_decision(redis_url: str, tmp_path: Path) -> None:
    ns = f"dl{uuid.uuid4().hex[:8]}"
    model_dir, prompts = write_task(tmp_path)
    env = {**os.environ, "MILES_REDIS_URL": redis_url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--log-json", f"bus.namespace={ns}", "bus.heartbeat_interval_s=0.5", "bus.heartbeat_ttl_s=5"]
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    train = [*CLI, "train", *common, f"trainer.model={model_dir}", "buffer.rollout_batch_size=4",
             "buffer.max_staleness=-1", "buffer.filters=[]", f"trainer.checkpoint_dir={ckpt}",
             "trainer.checkpoint_every=1", f"trainer.metrics_path={metrics}", "trainer.torch_threads=1"]  # fmt: skip
    cmds = {
        "feed": [*CLI, "feed", *common, f"feeder.path={prompts}", "feeder.num_epochs=0", "feeder.max_queued=8"],
        "produce": [*CLI, "produce", *common, f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4",
                    "rollout.reward=exact_match", "rollout.sampling.max_new_tokens=4", "rollout.torch_threads=1"],
        "train": train,
    }  # fmt: skip
    logs = {name: tmp_path / f"{name}.log" for name in cmds}
    files = {name: logs[name].open("wb") for name in cmds}
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=files[name])
             for name, cmd in cmds.items()}  # fmt: skip
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240, "two trained steps")
        with redis.Redis.from_url(redis_url) as client:
            client.flushall()  # what a restart without persistence leaves: nothing
        for proc in procs.values():
            proc.wait(timeout=60)  # each notices within a heartbeat or its next read
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in files.values():
            f.close()
    for name, proc in procs.items():
        log = logs[name].read_text()
        assert proc.returncode == 2, f"{name}: {proc.returncode}\n{log[-3000:]}"
        assert "Redis lost this run's data" in log or "no longer has a consumer group" in log, f"{name}: {log[-3000:]}"
        assert "Traceback" not in log, f"{name}: {log[-3000:]}"

    step = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer.json").read_text())["step"]
    refused = subprocess.run([*train, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "belongs to run" in refused.stderr, refused.stderr[-3000:]
    assert "reset-run" in refused.stderr and "Traceback" not in refused.stderr

    dry = subprocess.run([*CLI, "reset-run", f"bus.namespace={ns}"], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert dry.returncode == 2 and "--yes" in dry.stdout
    reset = subprocess.run([*CLI, "reset-run", f"bus.namespace={ns}", "--yes"], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert reset.returncode == 0, reset.stderr
    asyncio.run(publish_groups(redis_url, ns, groups(0, 8)))
    resumed = subprocess.run([*train, "--resume", f"trainer.max_steps={step + 2}", "--log-level", "debug"], env=env,
                             capture_output=True, text=True, timeout=180)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed_into_a_reset_run" in resumed.stderr
    trained = [g for line in resumed.stderr.splitlines() if '"batch_groups"' in line
               for g in json.loads(line)["group_ids"]]  # fmt: skip
    assert sorted(trained) == sorted(f"new{i}" for i in range(8))  # each group of the new run exactly once
    with redis.Redis.from_url(redis_url) as client:
        assert done_total(client, f"{ns}:done:trainer") == 8
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
