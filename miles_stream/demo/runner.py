"""The demo: one embedded Redis, and a feeder, a rollout producer and a trainer as separate processes.

    run_demo ── EmbeddedRedis ── spawns ──► miles-stream feed     (prompts.jsonl ─► {ns}:prompts)
       │                                    miles-stream produce  ({ns}:prompts ─► {ns}:trajectories)
       │                                    miles-stream train    ({ns}:trajectories ─► {ns}:weights)
       └── every 0.5 s: new lines of metrics.jsonl, producers alive (heartbeats); on each new weight version,
           greedy accuracy of those weights on the 100 prompts. Ends when the trainer exits (max_steps), then
           stops the others with SIGTERM, writes the plot, prints a summary.

Everything lands in the work directory: the model, the dataset, the resolved config (`demo.yaml`, usable
to attach another producer while the demo runs), one log per process, metrics.jsonl, eval.jsonl,
reward.png and the trained model (final-model/, a Hugging Face checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import yaml
from rich.console import Console

from miles_stream import aio
from miles_stream.bus import Keys, RedisConfig, alive_members, connect
from miles_stream.config import apply_overrides, build, load_yaml
from miles_stream.demo.plot import plot_run
from miles_stream.demo.task import greedy_accuracy, write_task
from miles_stream.demo.view import DemoState, render, summary
from miles_stream.errors import MilesStreamError, WeightIntegrityError
from miles_stream.redis_server import EmbeddedRedis, die_with_parent
from miles_stream.run_config import RunConfig, load_run_config
from miles_stream.weights.transports import RedisTransport
from miles_stream.weights.versions import WeightSubscriber

log = structlog.get_logger(__name__)
STALLED = "every group's rewards are equal (the policy is sure of its answers), so nothing more is learned"
DEFAULT_CONFIG = Path(__file__).parent.parent / "resources" / "demo.yaml"
TRAINER_EXIT_S = 60.0  # after being told to stop, the trainer commits and exports; one that takes longer is killed


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    work_dir: Path
    config: Path = DEFAULT_CONFIG
    overrides: Sequence[str] = ()
    steps: int | None = None  # None: the config's trainer.max_steps
    minutes: float = 5.0  # then the trainer is stopped (SIGTERM) wherever it is, and the demo ends
    target_accuracy: float = 0.9  # greedy accuracy at which the task counts as learned and the demo ends
    stall_s: float = 30.0  # no step for this long: every group is filtered (the policy is sure of every
    # answer, right or wrong), so nothing more will be learned; the demo ends
    live: bool = True  # a live table (rich); False: a line every few steps


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(slots=True)
class Run:
    work: Path
    config: RunConfig
    config_path: Path
    children: dict[str, Child] = field(default_factory=dict)


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    console = console or Console()
    work = options.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "eval.jsonl"):
        (work / name).unlink(missing_ok=True)
    console.print(f"[bold]miles-stream demo[/bold]: building the tiny model and the task in {work}")
    model_dir, prompts = write_task(work)
    server_config = load_run_config(options.config, options.overrides).redis_server  # redis_server.binary=...
    with EmbeddedRedis(replace(server_config, persistence="none", maxmemory="1gb")) as server:
        run = _prepare(work, options, model_dir, prompts)
        console.print(f"Server {server.version} ({server.binary}) at {server.url}.\n"
                      "To attach another producer while this runs:\n"
                      f"  MILES_REDIS_URL={server.url} miles-stream produce --config {run.config_path}")  # fmt: skip
        return aio.run(_supervise(run, server.url, options, console))


def _prepare(work: Path, options: DemoOptions, model_dir: Path, prompts: Path) -> Run:
    data = load_yaml(options.config)
    paths = [
        f"rollout.model={model_dir}",
        f"trainer.model={model_dir}",
        f"feeder.path={prompts}",
        f"trainer.metrics_path={work / 'metrics.jsonl'}",
        f"trainer.export_dir={work / 'final-model'}",
    ]
    if options.steps is not None:
        paths.append(f"trainer.max_steps={options.steps}")
    data = apply_overrides(data, [*paths, *options.overrides])
    config = build(RunConfig, data)  # a bad key fails here, before any process starts
    if config.trainer.max_steps < 1:
        raise MilesStreamError("the demo needs trainer.max_steps >= 1 (it ends when the trainer does)")
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return Run(work=work, config=config, config_path=path)


def _spawn(run: Run, name: str, command: str, url: str) -> Child:
    log_path = run.work / f"{name}.log"
    env = {**os.environ, "MILES_REDIS_URL": url, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as out:  # SIGTERM'd (and so shut down cleanly) if the demo itself dies
        proc = subprocess.Popen([sys.executable, "-m", "miles_stream.cli", command, "--config", str(run.config_path)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent,
                                start_new_session=True)  # Ctrl-C reaches the demo, which stops them  # fmt: skip
    return Child(name, proc, log_path)


async def _supervise(run: Run, url: str, options: DemoOptions, console: Console) -> int:
    state = DemoState(max_steps=run.config.trainer.max_steps, started=time.monotonic())
    redis = connect(RedisConfig(url=url))
    keys = Keys(run.config.bus.namespace)
    evaluator = _Evaluator(run, redis, keys)
    await evaluator.maybe_evaluate(state)  # the untrained policy: version 0
    for name, command in (("feeder", "feed"), ("producer", "produce"), ("trainer", "train")):
        run.children[name] = _spawn(run, name, command, url)
    failed: Child | None = None
    interrupt = asyncio.Event()  # Ctrl-C or SIGTERM: stop everything, summarise what there is
    stopping_since = 0.0  # when the trainer was told to stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, interrupt.set)
    try:
        with render(console, state, options.live) as refresh:
            while not interrupt.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupt.wait(), 0.5)
                if not state.stop_reason:
                    if state.evals and state.evals[-1][1] >= options.target_accuracy:
                        state.stop_reason = f"accuracy reached {options.target_accuracy:g}"
                    elif state.elapsed_s > options.minutes * 60:
                        state.stop_reason = f"time limit ({options.minutes:g} min)"
                    elif state.metrics and time.monotonic() - state.last_step_at > options.stall_s:
                        state.stop_reason = f"no step for {options.stall_s:g} s: {STALLED}"
                    if state.stop_reason:  # the trainer commits and exports on SIGTERM, then exits
                        run.children["trainer"].proc.send_signal(signal.SIGTERM)
                        stopping_since = time.monotonic()
                elif stopping_since and time.monotonic() - stopping_since > TRAINER_EXIT_S:
                    log.error("trainer_did_not_exit", after_s=TRAINER_EXIT_S)  # killed: reported as failed below
                    run.children["trainer"].proc.kill()
                _read_metrics(run.work / "metrics.jsonl", state)
                members = await alive_members(redis, keys, run.config.bus.heartbeat_ttl_s)
                state.producers = sum(m.role == "producer" for m in members)
                await evaluator.maybe_evaluate(state)
                refresh()
                trainer = run.children["trainer"].proc.poll()
                failed = next((c for c in run.children.values() if c.proc.poll() not in (None, 0)), None)
                if trainer is not None or failed is not None:
                    break
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupt.set()
    finally:
        _stop_all(run.children)
        _read_metrics(run.work / "metrics.jsonl", state)
        with contextlib.suppress(Exception):
            await evaluator.maybe_evaluate(state)
        await redis.aclose()
    if failed is not None:
        console.print(f"[red]the {failed.name} process failed (exit {failed.proc.returncode}); its log ends:[/red]")
        console.print(failed.tail(), markup=False)
        return 1
    if state.metrics:
        plot = plot_run(state.metrics, state.evals, run.work / "reward.png",
                        title=f"miles-stream demo: single-digit addition, {len(state.metrics)} steps")  # fmt: skip
        if state.stop_reason:
            console.print(f"stopped early: {state.stop_reason}")
        console.print(summary(state, run.work, plot))
    return 130 if interrupt.is_set() else 0


def _stop_all(children: dict[str, Child]) -> None:
    for child in children.values():
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for child in children.values():
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("child_killed", name=child.name)
            child.proc.kill()
            child.proc.wait()


def _read_metrics(path: Path, state: DemoState) -> None:
    if not path.exists():
        return
    with open(path) as f:
        f.seek(state.metrics_offset)
        for line in f:
            if not line.endswith("\n"):
                break  # a line being written: read it next time
            state.metrics.append(json.loads(line))
            state.metrics_offset += len(line.encode())
            state.last_step_at = time.monotonic()


class _Evaluator:
    """Greedy accuracy of each new weight version, on the demo's own copy of the model."""

    def __init__(self, run: Run, redis: Any, keys: Keys) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = run.config.trainer.model
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
        self.model.train(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.subscriber = WeightSubscriber(redis, keys, {"redis": RedisTransport(redis, keys)})
        self.publish_every = run.config.trainer.publish_every
        self.version = -1
        self.out = run.work / "eval.jsonl"

    async def maybe_evaluate(self, state: DemoState) -> None:
        latest = await self.subscriber.latest()
        version = latest[1].version if latest else 0
        if version == self.version:
            return
        if latest is not None:
            try:
                weights = await self.subscriber.load(latest[1])
            except WeightIntegrityError:  # pruned while we read it: a newer one is announced, try that next
                return
            self.model.load_state_dict(weights)
        accuracy = await asyncio.to_thread(greedy_accuracy, self.model, self.tokenizer)
        self.version = version
        step = version * self.publish_every
        state.evals.append((step, accuracy))
        line = json.dumps({"step": step, "version": version, "accuracy": accuracy}) + "\n"
        await asyncio.to_thread(_append, self.out, line)


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line)
