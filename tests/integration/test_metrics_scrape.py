"""The /metrics endpoint of live processes: a feeder, a producer and a trainer on a real Redis, each on its
own `metrics.port`, scraped over HTTP until their counters move; the names are those docs/metrics.md lists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from miles_stream.demo.task import write_task
from miles_stream.redis_server import free_port

CLI = [sys.executable, "-m", "miles_stream.cli"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples | None:
    """Every sample served at 127.0.0.1:port/metrics; None while nothing answers there yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), -1.0)


def scrape_until(port: int, ok: Callable[[Samples], bool], what: str, procs: dict[str, subprocess.Popen[bytes]],
                 timeout: float = 180.0) -> Samples:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode} while waiting for {what}"
        samples = scrape(port)
        if samples is not None and ok(samples):
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last scrape: {samples}"
        time.sleep(0.2)


@pytest.mark.process_tiers
def test_feeder_producer_and_trainer_serve_metrics_that_move(redis_url: str, tmp_path: Path) -> None:
    model_dir, prompts = write_task(tmp_path)
    ns = f"m{uuid.uuid4().hex[:8]}"
    ports = {"feed": free_port(), "produce": free_port(), "train": free_port()}
    common = ["--redis-url", redis_url, f"bus.namespace={ns}", "bus.heartbeat_interval_s=0.5"]
    cmds = {
        "feed": [*CLI, "feed", *common, f"feeder.path={prompts}", "feeder.num_epochs=0", "feeder.max_queued=8"],
        "produce": [*CLI, "produce", *common, f"rollout.model={model_dir}", "rollout.n_samples_per_prompt=4",
                    "rollout.reward=exact_match", "rollout.sampling.max_new_tokens=4", "rollout.torch_threads=1"],
        "train": [*CLI, "train", *common, f"trainer.model={model_dir}", "buffer.rollout_batch_size=2",
                  "buffer.max_staleness=-1", "buffer.filters=[]", "trainer.torch_threads=1"],
    }  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in cmds.items():
            with (tmp_path / f"{name}.log").open("wb") as err:
                procs[name] = subprocess.Popen([*cmd, f"metrics.port={ports[name]}"], env=env,
                                               stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        trained = scrape_until(ports["train"], lambda s: value(s, "miles_stream_trainer_steps_total") >= 1,
                               "the trainer's first step", procs)  # fmt: skip
        steps = value(trained, "miles_stream_trainer_steps_total")
        later = scrape_until(ports["train"], lambda s: value(s, "miles_stream_trainer_steps_total") > steps,
                             "the trainer's steps to move between scrapes", procs)  # fmt: skip
        assert value(later, "miles_stream_trainer_step_seconds_sum") > 0
        assert value(later, "miles_stream_batch_staleness_versions_count") >= 2 * (steps + 1)
        assert value(later, "miles_stream_batch_staleness_versions_bucket", le="+Inf") >= 2 * (steps + 1)
        assert value(later, "miles_stream_weight_version", role="trainer") >= 1
        assert value(later, "miles_stream_buffer_groups_total", outcome="accepted") >= 2 * (steps + 1)
        trajectories = f"{ns}:trajectories"
        assert value(later, "miles_stream_stream_pending_entries", stream=trajectories, group="trainer") >= 0
        assert value(later, "miles_stream_stream_length_entries", stream=f"{ns}:prompts") >= 0

        produced = scrape_until(ports["produce"], lambda s: value(s, "miles_stream_producer_tokens_total") > 0,
                                "the producer's tokens", procs)  # fmt: skip
        assert value(produced, "miles_stream_producer_events_total", event="groups") >= 1
        assert value(produced, "miles_stream_producer_in_flight") >= 0
        assert value(produced, "miles_stream_admission_waits_total") >= 0
        assert value(produced, "miles_stream_weight_version", role="producer") >= 0

        fed = scrape_until(ports["feed"], lambda s: value(s, "miles_stream_feeder_published_total") > 0,
                           "the feeder's published count", procs)  # fmt: skip
        assert value(fed, "miles_stream_feeder_published_total") >= 8
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for name in procs:  # the endpoint closed with its process
        assert scrape(ports[name]) is None, f"{name}'s endpoint still answers after it stopped"
