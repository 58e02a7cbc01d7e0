"""The ACL rules docs/redis.md gives operators for a namespace-limited user: the namespace's keys only, every
data-type and stream command, no administrative or dangerous ones (FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN,
CLIENT KILL, ...). On a Redis Cluster, also what both clients need to follow the slot map. Importable from any
test: the conftest beside it puts tests/ on sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from miles_stream.demo.task import write_task

ACL_RULES = ["on", "resetkeys", "~{ns}:*", "resetchannels", "-@all", "+@read", "+@write", "+@stream", "+@hash",
             "+@set", "+@sortedset", "+@string", "+@list", "+@transaction", "+@connection", "-@dangerous"]  # fmt: skip
CLUSTER_ACL_RULES = ["+cluster|slots", "+asking"]  # the slot map (CLUSTER SLOTS), and a migrating slot's ASK
CLI = [sys.executable, "-m", "miles_stream.cli"]


def feed_produce_train_status(
    url: str, ns: str, tmp_path: Path, extra: Sequence[str] = ()
) -> tuple[subprocess.CompletedProcess[str], str]:
    """feed, produce, train 3 steps and status as separate processes on `url` (a namespace-limited user's), each
    asserted to succeed: (the trainer's result, the producer's stderr). Shared with the cluster's ACL tests;
    `extra`: overrides every process gets (`bus.partitions=3`)."""
    model_dir, prompts = write_task(tmp_path)
    env = {**os.environ, "MILES_REDIS_URL": url, "HF_HUB_OFFLINE": "1"}
    common = [f"bus.namespace={ns}", *extra, "--log-json"]

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args, *common], capture_output=True, text=True, timeout=timeout, env=env)

    fed = run("feed", f"feeder.path={prompts}", "feeder.num_epochs=1")
    assert fed.returncode == 0, fed.stderr[-2000:]
    rollout = [f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4", "rollout.reward=exact_match",
               "rollout.sampling.max_new_tokens=1", "rollout.torch_threads=1"]  # fmt: skip
    producer = subprocess.Popen([*CLI, "produce", *common, *rollout], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        trained = run("train", f"trainer.model={model_dir}", "trainer.max_steps=3", "buffer.rollout_batch_size=4",
                      "buffer.filters=[]", "trainer.torch_threads=1", timeout=240)  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        status = run("status", "--json")
        assert status.returncode == 0, status.stderr[-2000:]
    finally:
        producer.terminate()
        _, err = producer.communicate(timeout=60)
    assert producer.returncode == 0, err[-3000:]
    return trained, err
