"""Rollout throughput with 1 and then 2 producer processes on the demo's task: does attaching one help?

    python bench/bench_producers.py [--seconds 30] [--json-out FILE]

Runs 1 and 2 producers with rollout.torch_threads=0 (torch's default: every core) and =1.

An embedded Redis, the feeder cycling the demo's 100 prompts, and N producers (`miles-stream produce` with
configs/demo.yaml) on the demo's tiny model; no trainer, backpressure lifted, so the figure is what the
producers make. Groups/s is the growth of the trajectory stream over the window, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from miles_stream.demo.task import write_task
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"


def measure(producers: int, seconds: float, work: Path, threads: int) -> float:
    model, prompts = write_task(work)
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as server:
        env = {**os.environ, "MILES_REDIS_URL": server.url, "HF_HUB_OFFLINE": "1"}
        common = [
            *("--config", str(CONFIG), f"rollout.model={model}", f"feeder.path={prompts}", "--log-level", "warning"),
            *("bus.max_backlog_entries=10000000", "bus.max_backlog_bytes=100000000000", "feeder.max_queued=1024"),
            f"rollout.torch_threads={threads}",
        ]
        cli = [sys.executable, "-m", "miles_stream.cli"]
        procs = [subprocess.Popen([*cli, "feed", *common], env=env)]
        procs += [subprocess.Popen([*cli, "produce", *common, f"rollout.producer_id=p{i}"], env=env)
                  for i in range(producers)]  # fmt: skip
        client = redis.Redis.from_url(server.url)
        while client.xlen("demo:trajectories") < 200:  # models loaded, running
            time.sleep(0.2)
        start_n, start_t = client.xlen("demo:trajectories"), time.monotonic()
        time.sleep(seconds)
        rate = (client.xlen("demo:trajectories") - start_n) / (time.monotonic() - start_t)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        client.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    results = {}
    for threads in (0, 1):
        for n in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                rate = measure(n, args.seconds, Path(tmp), threads)
            results[f"{n} producers, torch_threads={threads}"] = rate
            print(f"{n} producer(s), rollout.torch_threads={threads}: {rate:.1f} groups/s", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "groups_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
