"""Does async reach the demo's accuracy sooner than sync? (issue 37, item 1)

    python bench/bench_async_accuracy.py --runs 10 --lock /work/cpu.lock --out DIR
    python bench/bench_async_accuracy.py --replot DIR        # only the table and the plot, from DIR/runs.json

Each run is the demo itself (`miles-stream demo`'s `run_demo`: an embedded server, the evaluator, the trainer,
the feeder and the producer as processes, configs/demo.yaml as shipped) with one difference between the modes:
`async` keeps the demo's `buffer.max_staleness`, `sync` sets it to 0 (a group generated under any version but
the trainer's is dropped, and the producer starts groups only for the trainer's version). Runs alternate
(async, sync, async, ...), so that drift in the machine's load falls on both; each takes `--lock` (flock, the
same lock as `flock FILE cmd`) for its own duration only, so other jobs can run between runs. A run does not
stop at 0.9: it goes on for `--minutes` (the demo's clock, start-up included), or until 30 s pass without a
step (the demo's stall stop: every group is filtered; its weights no longer change).

Accuracy is the evaluator's greedy pass@1 on the 100 prompts (eval.jsonl), placed at the wall time of the
trainer step that published the version it scored (metrics.jsonl), counted from the trainer's first read (its
first step's end less its step and its wait). A version the evaluator skipped (it scores the newest when
behind) is not on the curve, so a time to 0.9 can be late by the evaluator's lag. Per run it records every
scored version, the seconds and steps to `--target`, the accuracy at each `--at` second (while the run was
still up), stale drops, groups read and the trainer's waiting share. Writes DIR/runs.json (after every run:
`--resume` continues it), DIR/table.md and DIR/accuracy.png.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import platform
import signal
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from miles_stream.config import load_yaml

ROOT = Path(__file__).parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
MODES = {"async": [], "sync": ["buffer.max_staleness=0"]}  # async: the demo's own max_staleness
COLORS = {"async": "tab:blue", "sync": "tab:orange"}
NEVER = 2.0  # the demo's target accuracy for these runs: never reached, so a run goes on past 0.9


class LockTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise LockTimeout


@contextlib.contextmanager
def cpu_lock(path: str, wait_s: float) -> Iterator[float]:
    """flock(path) held for the block (nothing when path is empty); yields the seconds spent waiting for it.
    A blocking flock, as `flock FILE cmd` takes it (a poll with LOCK_NB would lose every hand-over to the
    blocked waiters the kernel wakes at once), bounded by an alarm."""
    if not path:
        yield 0.0
        return
    began = time.monotonic()
    with open(path, "a") as f:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(wait_s)))
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except LockTimeout:
            raise SystemExit(f"--lock {path}: not free after {wait_s:.0f} s") from None
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        try:
            yield time.monotonic() - began
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def one_run(mode: str, index: int, args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from miles_stream.demo import DemoOptions, run_demo  # imports torch and transformers

    work = args.out / "runs" / f"{mode}-{index:02d}"
    text = io.StringIO()
    options = DemoOptions(work_dir=work, overrides=MODES[mode], minutes=args.minutes, target_accuracy=NEVER, live=False)
    with cpu_lock(args.lock, args.lock_wait_s) as waited:
        load = os.getloadavg()[0]  # what other jobs left running as this run starts
        started = time.time()
        rc = run_demo(options, Console(file=text, width=200))
        ended = time.time()
    (work / "demo.out").write_text(text.getvalue())
    metrics = _jsonl(work / "metrics.jsonl")
    evals = _jsonl(work / "eval.jsonl")
    return record(
        mode,
        index,
        rc,
        metrics,
        evals,
        started=started,
        ended=ended,
        lock_wait_s=waited,
        load1=load,
        stop=next((line for line in text.getvalue().splitlines() if "stopped early" in line), ""),
    )


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def record(
    mode: str, index: int, rc: int, metrics: list[dict[str, Any]], evals: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """One run as kept in runs.json: its curve (version, step, seconds, pass@1) and its counters."""
    if not metrics:
        return {"mode": mode, "index": index, "rc": rc, "steps": 0, "curve": [], **extra}
    first = metrics[0]
    t0 = first["time"] - first["step_s"] - first["wait_s"]  # the trainer's first read
    at_version = {m["version"]: (m["step"], m["time"] - t0) for m in metrics}
    curve = [(0, 0, 0.0, e["pass_at_1"], e.get("skipped", 0)) for e in evals if e["version"] == 0][:1]
    curve += [
        (e["version"], *at_version[e["version"]], e["pass_at_1"], e.get("skipped", 0))
        for e in evals
        if e["version"] in at_version
    ]
    last = metrics[-1]
    run_s = last["time"] - t0
    stalled = "no step for" in extra.get("stop", "")  # nothing left to learn from: its weights are final
    started, ended = extra.pop("started"), extra.pop("ended")
    return {
        "mode": mode,
        "index": index,
        "rc": rc,
        "t0": t0,
        "stalled": stalled,
        # how long the run was up: to its last step (time limit: stopped within a step of it), or, stalled, to
        # the demo's end (its last weights stand: no group had anything to learn from)
        "end_s": ended - t0 if stalled else run_s,
        "started_before_t0_s": t0 - started,  # the demo's start-up: server, evaluator, processes
        "steps": last["step"],
        "steps_per_s": last["step"] / run_s,
        "trainer_wait_share": sum(m["wait_s"] for m in metrics) / run_s,
        "groups_read": last["rollout_groups"],
        "filtered": last["filtered"],
        "stale_dropped": last["stale_dropped"],
        "max_staleness_seen": max(m["staleness_max"] for m in metrics),
        "curve": [dict(zip(("version", "step", "t_s", "pass_at_1", "skipped"), c, strict=True)) for c in curve],
        **extra,
    }


def reach(run: dict[str, Any], target: float) -> tuple[float, int] | None:
    """(seconds, steps) to the first scored version at or above target; None if none was."""
    hit = next((c for c in sorted(run["curve"], key=lambda c: c["t_s"]) if c["pass_at_1"] >= target), None)
    return None if hit is None else (hit["t_s"], hit["step"])


def accuracy_at(run: dict[str, Any], t: float) -> float | None:
    """pass@1 of the newest scored version published by wall time t; None if the run had ended by then (a
    stalled run's last weights stand for every later t)."""
    if not run["curve"] or (t > run["end_s"] and not run["stalled"]):
        return None
    return max((c for c in run["curve"] if c["t_s"] <= t), key=lambda c: c["t_s"])["pass_at_1"]


def _spread(values: Sequence[float], fmt: str) -> str:
    """median (min-max); values may hold inf (not reached), which sorts last."""
    if not values:
        return "-"
    median = statistics.median(values)
    show = lambda v: "not reached" if v == float("inf") else format(v, fmt)  # noqa: E731
    return f"{show(median)} ({show(min(values))}-{show(max(values))})"


def summarise(runs: list[dict[str, Any]], target: float, at: Sequence[float]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode and r["curve"]]
        hits = [reach(r, target) for r in mine]
        inf = float("inf")
        out[mode] = {
            "runs": len(mine),
            "reached": sum(h is not None for h in hits),
            "seconds": [inf if h is None else h[0] for h in hits],
            "steps": [inf if h is None else h[1] for h in hits],
            **{f"accuracy_at_{t:g}s": [a for r in mine if (a := accuracy_at(r, t)) is not None] for t in at},
            "stale_share": [r["stale_dropped"] / max(r["groups_read"], 1) for r in mine],
            "stale_dropped": [r["stale_dropped"] for r in mine],
            "steps_per_s_to_target": [h[1] / h[0] for h in hits if h is not None and h[0] > 0],
            "steps_per_s": [r["steps_per_s"] for r in mine],
            "trainer_wait_share": [r["trainer_wait_share"] for r in mine],
        }
    return out


def _of(values: Sequence[float], runs: int) -> str:
    return "" if len(values) == runs else f" ({len(values)} of {runs} runs still up)"


def table(summary: dict[str, dict[str, Any]], target: float, at: Sequence[float]) -> str:
    cols = [
        f"seconds to {target:g}",
        f"steps to {target:g}",
        *(f"accuracy at {t:g} s" for t in at),
        "stale drops (share of groups read)",
        f"steps/s to {target:g}",
        "steps/s, whole run",
        "trainer waiting",
    ]
    lines = ["| mode | runs | reached | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 3)]
    for mode, s in summary.items():
        cells = [
            _spread(s["seconds"], ".0f"),
            _spread(s["steps"], ".0f"),
            *(_spread(s[f"accuracy_at_{t:g}s"], ".2f") + _of(s[f"accuracy_at_{t:g}s"], s["runs"]) for t in at),
            f"{_spread(s['stale_dropped'], '.0f')}; {_spread([100 * x for x in s['stale_share']], '.1f')}%",
            _spread(s["steps_per_s_to_target"], ".2f"),
            _spread(s["steps_per_s"], ".2f"),
            _spread([100 * x for x in s["trainer_wait_share"]], ".0f") + "%",
        ]
        lines.append(f"| {mode} | {s['runs']} | {s['reached']} / {s['runs']} | " + " | ".join(cells) + " |")
    if {"async", "sync"} <= summary.keys():
        a, s = (statistics.median(summary[m]["seconds"]) for m in ("async", "sync"))
        if a not in (0, float("inf")) and s != float("inf"):
            lines.append(f"\nMedian seconds to {target:g}: sync / async = {s / a:.2f}.")
    return "\n".join(lines) + "\n"


def run_rows(runs: list[dict[str, Any]], target: float, at: Sequence[float]) -> str:
    head = [
        "run",
        "mode",
        f"s to {target:g}",
        f"steps to {target:g}",
        *(f"acc at {t:g} s" for t in at),
        "steps",
        "end s",
        "stale / read",
        "lock wait s",
        "load avg",
        "ended by",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in runs:
        hit = reach(r, target) if r["curve"] else None
        accs = [accuracy_at(r, t) if r["curve"] else None for t in at]
        cells = [
            str(r["index"]),
            r["mode"],
            f"{hit[0]:.0f}" if hit else "-",
            str(hit[1]) if hit else "-",
            *("-" if a is None else f"{a:.2f}" for a in accs),
            str(r["steps"]),
            f"{r.get('end_s', 0):.0f}",
            f"{r.get('stale_dropped', 0)} / {r.get('groups_read', 0)}",
            f"{r.get('lock_wait_s', 0):.0f}",
            f"{r.get('load1', 0):.1f}",
            r.get("stop", "").replace("stopped early: ", "") or f"rc {r['rc']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], target: float, at: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode and r["curve"]]
        if not mine:
            continue
        for r in mine:
            t = [c["t_s"] for c in r["curve"]] + [r["end_s"]]
            ax.step(
                t,
                [c["pass_at_1"] for c in r["curve"]] + [r["curve"][-1]["pass_at_1"]],
                where="post",
                color=COLORS.get(mode),
                alpha=0.2,
                linewidth=1,
            )
        up = [r["end_s"] for r in mine if not r["stalled"]] or [max(r["end_s"] for r in mine)]
        grid = np.arange(0.0, min(up), 0.25)  # while every run is up (or stalled, its weights final)
        median = [
            statistics.median(acc) if (acc := [a for r in mine if (a := accuracy_at(r, t)) is not None]) else np.nan
            for t in grid
        ]
        label = f"{mode} ({' '.join(MODES.get(mode, [])) or 'as the demo ships'}): median of {len(mine)}"
        ax.plot(grid, median, color=COLORS.get(mode), linewidth=2.5, label=label)
    ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    for t in at:
        ax.axvline(t, color="grey", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set(
        xlabel="wall time since the trainer's first read (s)",
        ylabel="greedy accuracy (evaluator's pass@1)",
        ylim=(0, 1),
        title="demo task on 2 busy CPU cores: async against sync, every run faint",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(doc: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    runs, target, at = doc["runs"], doc["target"], doc["at"]
    summary = summarise(runs, target, at)
    (out / "table.md").write_text(table(summary, target, at) + "\n" + run_rows(runs, target, at))
    if any(r["curve"] for r in runs):
        plot(runs, target, at, out / "accuracy.png")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where runs.json, table.md, accuracy.png and the runs go")
    parser.add_argument("--runs", type=int, default=10, help="runs a mode")
    parser.add_argument("--modes", default="async,sync", help=f"alternated, in this order; of {sorted(MODES)}")
    parser.add_argument("--minutes", type=float, default=1.5, help="each run's length (the demo's clock)")
    parser.add_argument("--target", type=float, default=0.9, help="greedy accuracy to reach")
    parser.add_argument("--at", default="30,60", help="wall times (s) at which accuracy is read")
    parser.add_argument("--lock", default="", help="flock this file for each run (e.g. /work/cpu.lock)")
    parser.add_argument("--lock-wait-s", type=float, default=3600.0, help="give up if the lock is not free by then")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in OUT/runs.json, do the rest")
    parser.add_argument("--replot", type=Path, metavar="DIR", help="only the table and the plot of DIR/runs.json")
    args = parser.parse_args()
    if args.replot is not None:
        doc = json.loads((args.replot / "runs.json").read_text())
        print(table(write_outputs(doc, args.replot), doc["target"], doc["at"]))
        return
    if args.out is None:
        parser.error("--out DIR is needed (or --replot DIR)")
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown {unknown}; choose from {sorted(MODES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "runs.json"
    doc = {
        "target": args.target,
        "at": [float(t) for t in args.at.split(",")],
        "max_staleness_async": load_yaml(DEMO_CONFIG)["buffer"]["max_staleness"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [],
    }
    if args.resume and saved.is_file():
        doc["runs"] = json.loads(saved.read_text())["runs"]
    done = {(r["mode"], r["index"]) for r in doc["runs"]}
    for index in range(1, args.runs + 1):
        for mode in modes:
            if (mode, index) in done:
                continue
            run = one_run(mode, index, args)
            doc["runs"].append(run)
            saved.write_text(json.dumps(doc, indent=1))
            hit = reach(run, args.target) if run["curve"] else None
            print(
                f"{mode} {index}: {run['steps']} steps, to {args.target:g}: "
                f"{f'{hit[0]:.0f} s, {hit[1]} steps' if hit else 'not reached'}, rc {run['rc']}",
                flush=True,
            )
    print(table(write_outputs(doc, args.out), args.target, doc["at"]))


if __name__ == "__main__":
    main()
