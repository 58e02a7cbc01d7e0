"""The demo: one embedded Redis, and an evaluator, a feeder, a rollout producer and a trainer as processes.

    run_demo ── EmbeddedRedis ── spawns ──► miles-stream eval     ({ns}:weights ─► eval.jsonl, {ns}:eval)
       │                                    then, once the evaluator has scored the untrained weights (version 0):
       │                                    miles-stream train    ({ns}:trajectories ─► {ns}:weights)
       │                                    miles-stream feed     (prompts.jsonl ─► {ns}:prompts)
       │                                    miles-stream produce  ({ns}:prompts ─► {ns}:trajectories)
       └── every 0.5 s: new lines of metrics.jsonl and eval.jsonl, producers alive (heartbeats). The accuracy
           shown is the evaluator's pass@1 (greedy) on the 100 prompts, of the newest version it scored. Ends when
           the trainer exits (max_steps), waits for the evaluator to score the last version, then stops the others
           with SIGTERM, writes the plot, prints a summary.

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
from miles_stream.demo.task import write_task
from miles_stream.demo.view import DemoState, render, summary
from miles_stream.errors import MilesStreamError
from miles_stream.redis_server import EmbeddedRedis, die_with_parent
from miles_stream.run_config import RunConfig, load_run_config
from miles_stream.weights.versions import WeightSubscriber

log = structlog.get_logger(__name__)
STALLED = "every group's rewards are equal (the policy is sure of its answers), so nothing more is learned"
DEFAULT_CONFIG = Path(__file__).parent.parent / "resources" / "demo.yaml"
TRAINER_EXIT_S = 60.0  # after being told to stop, the trainer commits and exports; one that takes longer is killed
EVAL_START_S = 120.0  # the evaluator's start (torch, the model) and its score of version 0, at most
LAST_EVAL_S = 30.0  # after the trainer exits: the evaluator's score of the last version, at most


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
        f"eval.path={prompts}",  # the demo has no held-out set: the evaluator scores the 100 training prompts
        f"eval.out={work / 'eval.jsonl'}",
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
    evals = _EvalLog(run.work / "eval.jsonl", run.config.trainer.publish_every)
    run.children["evaluator"] = _spawn(run, "evaluator", "eval", url)
    failed = await _first_eval(run, evals, state)  # version 0 is scored before any other exists
    if failed is None:  # the rest together: a producer started alone has no trainer's staleness budget to keep
        for name, command in (("trainer", "train"), ("feeder", "feed"), ("producer", "produce")):
            run.children[name] = _spawn(run, name, command, url)
    interrupt = asyncio.Event()  # Ctrl-C or SIGTERM: stop everything, summarise what there is
    stopping_since = 0.0  # when the trainer was told to stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, interrupt.set)
    try:
        with render(console, state, options.live) as refresh:
            while failed is None and not interrupt.is_set():
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
                evals.read(state)
                members = await alive_members(redis, keys, run.config.bus.heartbeat_ttl_s)
                state.producers = sum(m.role == "producer" for m in members)
                refresh()
                trainer = run.children["trainer"].proc.poll()
                failed = next((c for c in run.children.values() if c.proc.poll() not in (None, 0)), None)
                if trainer is not None or failed is not None:
                    break
            if failed is None and not interrupt.is_set():
                await _last_eval(run, redis, keys, evals, state)
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupt.set()
    finally:
        _stop_all(run.children)
        _read_metrics(run.work / "metrics.jsonl", state)
        evals.read(state)
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


class _EvalLog:
    """New lines of the evaluator's eval.jsonl: (trainer step, pass@1) into the demo's state."""

    def __init__(self, path: Path, publish_every: int) -> None:
        self.path, self.publish_every = path, publish_every
        self.offset, self.version = 0, -1  # bytes read; the newest version scored

    def read(self, state: DemoState) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith("\n"):
                    break  # a line being written: read it next time
                row = json.loads(line)
                self.offset += len(line.encode())
                self.version = max(self.version, int(row["version"]))
                state.evals.append((int(row["version"]) * self.publish_every, float(row["pass_at_1"])))


async def _first_eval(run: Run, evals: _EvalLog, state: DemoState) -> Child | None:
    """Wait for the evaluator's score of version 0 (the trainer starts after it); the child that failed, if one
    did. A timeout is the evaluator's failure."""
    deadline = time.monotonic() + EVAL_START_S
    while not state.evals:
        failed = next((c for c in run.children.values() if c.proc.poll() not in (None, 0)), None)
        if failed is not None:
            return failed
        if time.monotonic() > deadline:
            log.error("evaluator_did_not_start", after_s=EVAL_START_S)
            run.children["evaluator"].proc.kill()
            run.children["evaluator"].proc.wait()
            return run.children["evaluator"]
        await asyncio.sleep(0.1)
        evals.read(state)
    return None


async def _last_eval(run: Run, redis: Any, keys: Keys, evals: _EvalLog, state: DemoState) -> None:
    """After the trainer exits: wait (LAST_EVAL_S at most) until the evaluator has scored the last version."""
    latest = await WeightSubscriber(redis, keys, {}).latest()
    last = latest[1].version if latest is not None else 0
    deadline = time.monotonic() + LAST_EVAL_S
    while evals.version < last and time.monotonic() < deadline and run.children["evaluator"].proc.poll() is None:
        await asyncio.sleep(0.1)
        evals.read(state)
    if evals.version < last:
        log.warning("last_version_not_evaluated", version=last, evaluated=evals.version)
