"""Two trainers in one namespace, as real processes on a real Redis, each ending with the exact accounting.

the same train command run twice        the second is refused at once, naming the first; the first's
                                        run, checkpoints and commits are untouched
a trainer frozen past its lease         (SIGSTOP) a standby takes the lease, resumes from the shared
while a standby waits                   checkpoint and trains its groups; the frozen one wakes while the
                                        standby runs and writes nothing: no commit, no checkpoint, no
                                        weight version; every group is in the final lineage exactly once
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.schema import TrajectoryGroup
from miles_stream.testing.synthetic import synthetic_group

CLI = [sys.executable, "-m", "miles_stream.cli"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig())


def groups(count: int) -> list[TrajectoryGroup]:
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        g = synthetic_group(rng, n_samples=4, prompt_len=5, response_len=int(rng.integers(3, 10)), vocab=50,
                            group_id=f"g{i}", prompt_key=str(i))  # fmt: skip
        out.append(replace(g, samples=tuple(replace(s, reward=float(k % 2)) for k, s in enumerate(g.samples))))
    return out


def train_cmd(ns: str, model_dir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    """A trainer with a short lease and fast reclaim; `ckpt` may be shared, `out` (metrics) is its own."""
    return [*CLI, "train", "--log-json", "--log-level", "debug", f"bus.namespace={ns}", f"trainer.model={model_dir}",
            "bus.lease_ttl_s=2", "bus.claim_idle_ms=3000", "bus.claim_interval_s=0.5", "buffer.rollout_batch_size=4",
            "buffer.max_staleness=-1", "buffer.filters=[]", "trainer.lr=1e-3", "trainer.recompute_old_logprobs=false",
            f"trainer.checkpoint_dir={ckpt}", "trainer.checkpoint_every=2", f"trainer.metrics_path={out}",
            *extra]  # fmt: skip


def steps_done(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def trained(log: str) -> dict[int, list[str]]:
    """step -> group ids, from a trainer's debug log."""
    return {e["step"]: e["group_ids"] for e in map(json.loads, filter(lambda s: '"batch_groups"' in s,
                                                                       log.splitlines()))}  # fmt: skip


def announced(client: redis.Redis, ns: str) -> list[int]:
    return [int(f[b"version"]) for _, f in client.xrange(f"{ns}:weights")]


@pytest.mark.process_tiers
def test_the_same_trainer_started_twice_is_refused_and_the_first_is_untouched(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    ns = f"dup{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url}
    asyncio.run(publish_groups(redis_url, ns, groups(12)[:8]))
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "first.jsonl"
    first = subprocess.Popen([*train_cmd(ns, model_dir, ckpt, metrics), "trainer.max_steps=3"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:  # the first trains two steps, then waits for the groups of its third
        wait_for(lambda: steps_done(metrics) >= 2 or first.poll() is not None, 120, "the first trainer's steps")
        second = subprocess.run([*train_cmd(ns, model_dir, ckpt, tmp_path / "second.jsonl"), "trainer.max_steps=3"],
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        asyncio.run(publish_groups(redis_url, ns, groups(12)[8:]))
        _, first_log = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert "another trainer holds this namespace's lease: trainer-0 (pid" in second.stderr
    assert "Traceback" not in second.stderr
    assert not trained(second.stderr)  # it read nothing
    assert first.returncode == 0, first_log[-3000:]
    steps = trained(first_log)
    assert sorted(g for ids in steps.values() for g in ids) == sorted(f"g{i}" for i in range(12))
    assert (ckpt / (ckpt / "latest").read_text().strip() / "trainer.json").is_file()  # latest names a whole one
    with redis.Redis.from_url(redis_url) as client:
        assert done_total(client, f"{ns}:done:trainer") == 12
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
        assert not client.exists(f"{ns}:lease:trainer")  # given up at the end


@pytest.mark.process_tiers
def test_a_frozen_trainer_wakes_after_a_standby_took_over_and_writes_nothing(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    ns = f"fz{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MILES_REDIS_URL": redis_url}
    asyncio.run(publish_groups(redis_url, ns, groups(24)))
    ckpt, a_metrics, b_metrics = tmp_path / "ckpt", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    slow = ["trainer.updates_per_batch=4", "trainer.micro_batch_tokens=8"]  # a step of many small passes
    a = subprocess.Popen([*train_cmd(ns, model_dir, ckpt, a_metrics), *slow], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert a.stderr is not None
    b = None
    seen: list[str] = []
    try:
        for line in a.stderr:  # freeze A inside step 3: steps 1-2 are checkpointed and committed, 3 is not
            seen.append(line)
            if '"batch_groups"' in line and '"step": 3' in line:
                a.send_signal(signal.SIGSTOP)
                break
        b = subprocess.Popen([*train_cmd(ns, model_dir, ckpt, b_metrics), *slow, "trainer.standby_s=120",
                              "trainer.max_steps=6", "--resume"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_for(lambda: steps_done(b_metrics) >= 1 or b.poll() is not None, 180, "the standby's first step")
        with redis.Redis.from_url(redis_url) as client:
            versions_before_wake = announced(client, ns)
        a.send_signal(signal.SIGCONT)  # A wakes while B trains: it finishes step 3 and must write none of it
        _, rest = a.communicate(timeout=120)
        a_log = "".join(seen) + rest
        _, b_log = b.communicate(timeout=180)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert a.returncode == 2, a_log[-3000:]
    assert "lease_lost_stopping" in a_log and "Traceback" not in a_log
    assert b.returncode == 0, b_log[-3000:]
    assert "checkpoint_saved" not in rest and "weights_published" not in rest  # A wrote nothing after waking

    a_steps_log, b_steps_log = trained(a_log), trained(b_log)
    assert sorted(b_steps_log) == [3, 4, 5, 6]  # B resumed from A's step-2 checkpoint
    lineage = [g for s in (1, 2) for g in a_steps_log[s]] + [g for s in (3, 4, 5, 6) for g in b_steps_log[s]]
    assert sorted(lineage) == sorted(f"g{i}" for i in range(24))  # each group exactly once in the final weights
    assert set(a_steps_log[3]) <= set(lineage[8:])  # A's uncommitted step 3 was trained again by B
    with redis.Redis.from_url(redis_url) as client:
        assert done_total(client, f"{ns}:done:trainer") == 24
        assert client.xinfo_groups(f"{ns}:trajectories")[0]["pending"] == 0
        versions = announced(client, ns)
    assert versions == sorted(set(versions))  # every version announced once, never reused, never backwards
    assert versions[: len(versions_before_wake)] == versions_before_wake
    meta = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer.json").read_text())
    assert meta["step"] == 6  # B's, not overwritten by A
