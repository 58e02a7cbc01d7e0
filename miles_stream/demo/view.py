"""What the demo shows: a live table while it runs (or a line every few steps), then a summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass(slots=True)
class DemoState:
    max_steps: int
    started: float
    metrics: list[dict[str, Any]] = field(default_factory=list)
    metrics_offset: int = 0
    evals: list[tuple[int, float]] = field(default_factory=list)  # (trainer step, greedy accuracy)
    producers: int = 0
    printed_step: int = 0
    last_step_at: float = 0.0  # monotonic time the last metrics row arrived
    stop_reason: str = ""  # why the demo stopped the trainer before max_steps, if it did

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def recent(self, key: str, window: int = 10) -> float | None:
        values = [m[key] for m in self.metrics[-window:] if key in m]
        return sum(values) / len(values) if values else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(state: DemoState) -> Table:
    last = state.metrics[-1] if state.metrics else {}
    t = Table(title="miles-stream demo: single-digit addition mod 10", show_header=False, min_width=60)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("step", f"{last.get('step', 0)} / {state.max_steps}   (weights v{last.get('version', 0)})")
    t.add_row("elapsed", f"{state.elapsed_s:.0f} s")
    accuracy = state.evals[-1][1] if state.evals else None
    first = state.evals[0][1] if state.evals else None
    t.add_row("accuracy (greedy, 100 prompts)", f"{_fmt(accuracy)}   (started at {_fmt(first)})")
    t.add_row("rollout reward (last 10 steps)", _fmt(state.recent("rollout_reward")))
    t.add_row("staleness (mean / max)", f"{_fmt(last.get('staleness_mean'))} / {last.get('staleness_max', '-')}")
    t.add_row("trainer tokens/s", _fmt(state.recent("tokens_per_s"), ",.0f"))
    groups = f"{last.get('rollout_groups', 0)} / {last.get('filtered', 0)} / {last.get('stale_dropped', 0)}"
    t.add_row("groups: read / no signal / stale", groups)
    t.add_row("producers attached", str(state.producers))
    return t


@contextlib.contextmanager
def render(console: Console, state: DemoState, live: bool) -> Iterator[Callable[[], None]]:
    """Yields a refresh function: redraws the live table, or prints a line every 10 steps."""
    if live and console.is_terminal:
        with Live(table(state), console=console, refresh_per_second=4, transient=False) as view:
            yield lambda: view.update(table(state))
        return

    def line() -> None:
        step = state.metrics[-1]["step"] if state.metrics else 0
        if step >= state.printed_step + 10 or (step == state.max_steps and step > state.printed_step):
            state.printed_step = step
            accuracy = state.evals[-1][1] if state.evals else None
            reward = _fmt(state.recent("rollout_reward"))
            console.print(
                f"step {step:4d}/{state.max_steps}  {state.elapsed_s:5.0f} s  accuracy {_fmt(accuracy)}  "
                f"rollout reward {reward}  producers {state.producers}"
            )

    yield line


def summary(state: DemoState, work: Path, plot: Path) -> Table:
    t = Table(title="demo summary", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    first_reward = sum(m["rollout_reward"] for m in state.metrics[:10]) / min(len(state.metrics), 10)
    t.add_row("steps", f"{state.metrics[-1]['step']} in {state.elapsed_s:.0f} s")
    if state.evals:
        best = max(a for _, a in state.evals)
        t.add_row("accuracy (greedy)", f"{state.evals[0][1]:.2f} -> {state.evals[-1][1]:.2f} (best {best:.2f})")
    t.add_row("rollout reward", f"{first_reward:.2f} (first 10 steps) -> {_fmt(state.recent('rollout_reward'))} "
              "(last 10)")  # fmt: skip
    last = state.metrics[-1]
    t.add_row("groups", f"{last['rollout_groups']} read by the trainer, {last['filtered']} without signal, "
              f"{last['stale_dropped']} too stale")  # fmt: skip
    t.add_row("plot", str(plot))
    t.add_row("metrics", str(work / "metrics.jsonl"))
    t.add_row("trained model", str(work / "final-model"))
    return t
