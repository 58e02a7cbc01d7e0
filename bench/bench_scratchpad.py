"""Async against sync to the same accuracy, on the long-answer scratchpad task (miles_stream/tasks/scratchpad.py).

    python bench/bench_scratchpad.py --size 0.1b --sft-steps 700 --minutes 2 --out DIR     # one GPU
    python bench/bench_scratchpad.py --cpu --size cpu --digits 1-12 --carry-noise 0.5 ... --out DIR   # 2 CPU cores
                                                            (docs/benchmarks.md has the command that ran)

1. the task: model, worked answers, 50,000 fresh prompts (`--digits LO-HI`: operands of LO to HI digits,
   long-tailed towards HI);
2. SFT warm start through the CLI (`miles-stream train --sft`, configs/scratchpad-sft.yaml), a checkpoint
   every `--probe-every` steps; RL needs a middling model (a group with some answers right and some wrong), so
   the checkpoints are probed in order (sampled accuracy on held-out problems, the native engine at T=1) up to
   the first at or above `--start-accuracy`, and of the last two the one nearer to it is exported and used;
3. for each mode (MODES: async is max staleness 2, sync 0; recycle and oversample are async with
   `rollout.on_update=recycle` or `rollout.over_sampling=1.5`), the real processes through the CLI (embedded
   server, feeder, producer, trainer; configs/scratchpad-grpo.yaml plus `--set` overrides) from that model,
   the same seed, for the same wall time; then SIGTERM. `--runs N` repeats the modes N times, alternating
   (async, sync, ..., async, sync, ...), each run under `--lock` (flock) for its own duration only.
Accuracy is each step's rollout accuracy (share of its groups' samples with reward 1: sampled at temperature 1
on prompts never seen before), against the wall time since the trainer's first step. Time to target: the
first time the mean over 5 steps reaches `--target` (default: the midpoint between the first 5 steps' mean and
the best 5-step mean, medians over the runs). Wasted tokens: response tokens of the groups read that were
dropped (or re-queued) as stale, over all response tokens read (the trainer's counters). Writes DIR/result.json
and DIR/accuracy.png; `--replot` only summarises the runs already in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_async_accuracy import cpu_lock  # bench/bench_async_accuracy.py, beside this script
from safetensors.torch import load_model
from transformers import AutoTokenizer

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, die_with_parent
from miles_stream.rewards.base import RewardInput
from miles_stream.rewards.builtin import scratchpad_addition
from miles_stream.rollout import GenerationRequest, SamplingParams
from miles_stream.run_config import load_run_config
from miles_stream.tasks.scratchpad import MAX_DIGITS, MIN_DIGITS, digit_range, write_task
from miles_stream.trainer.torch.hf import export_hf, load_causal_lm

ROOT = Path(__file__).parents[1]
CLI = [sys.executable, "-m", "miles_stream.cli"]
MODES = {
    "async": ["buffer.max_staleness=2"],
    "sync": ["buffer.max_staleness=0"],
    "recycle": ["buffer.max_staleness=2", "rollout.on_update=recycle"],
    "oversample": ["buffer.max_staleness=2", "rollout.over_sampling=1.5"],
}
CPU = ["trainer.device=cpu", "trainer.dtype=float32", "trainer.compile=false", "trainer.torch_threads=1"]
CPU_ROLLOUT = ["rollout.device=cpu", "rollout.dtype=float32", "rollout.torch_threads=1",
               "rollout.max_inflight_prompts=32", "buffer.rollout_batch_size=16", "trainer.lr=1e-4"]  # fmt: skip


def cpu_overrides(args: argparse.Namespace) -> list[str]:
    """Everything on CPU, one core each, the answer budget sized to --digits: an answer is 10n + 2 characters
    and the end of sequence, a prompt 2n + 2 characters and the start."""
    if not args.cpu:
        return []
    hi = args.digits[1]
    return [*CPU, *CPU_ROLLOUT, f"rollout.sampling.max_new_tokens={10 * hi + 3}",
            f"rollout.max_seq_len={12 * hi + 8}"]  # fmt: skip


def sft(work: Path, paths: dict[str, Path], args: argparse.Namespace) -> Path:
    """SFT with a checkpoint every --probe-every steps; returns the exported model of the checkpoint picked."""
    checkpoints = work / "sft-checkpoints"
    cmd = [*CLI, "train", "--sft", str(paths["sft"]), "--config", str(ROOT / "configs" / "scratchpad-sft.yaml"),
           f"trainer.model={paths['model']}", f"trainer.max_steps={args.sft_steps}",
           f"trainer.checkpoint_dir={checkpoints}", f"trainer.checkpoint_every={args.probe_every}",
           "trainer.keep_checkpoints=1000", f"trainer.metrics_path={work / 'sft-metrics.jsonl'}",
           *(CPU if args.cpu else []), *args.sft_set]  # fmt: skip
    started = time.perf_counter()
    if (checkpoints / f"step-{args.sft_steps:08d}").is_dir():  # an earlier call's SFT ran to the end: probe it again
        print(f"sft: the {args.sft_steps} steps' checkpoints are in {checkpoints} already", flush=True)
    else:
        with (work / "sft.log").open("w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.sft_steps * 2 + 600)
        if done.returncode != 0:
            raise RuntimeError(f"SFT exited {done.returncode}: see {work / 'sft.log'}")
        print(f"sft: {args.sft_steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
    saved = sorted(checkpoints.glob("step-*"))
    held_out = [json.loads(line) for line in paths["eval"].read_text().splitlines()][: args.probe_prompts]
    dtype = "float32" if args.cpu else "bfloat16"
    probes: list[dict[str, Any]] = []
    for step_dir in [d for d in saved if int(d.name.partition("-")[2]) >= args.probe_from] or saved[-1:]:
        model = export_checkpoint(step_dir, paths["model"], work / "sft-model", dtype)
        began = time.perf_counter()
        accuracy = asyncio.run(sampled_accuracy(model, held_out, args))
        probes.append({"checkpoint": step_dir.name, "sampled_accuracy": accuracy})
        print(
            f"probe: {step_dir.name} sampled accuracy {accuracy:.3f} ({time.perf_counter() - began:.0f} s)", flush=True
        )
        if accuracy >= args.start_accuracy:
            break
    # of the last two probed, the one nearer --start-accuracy (accuracy can jump 0.14 -> 0.74 in 50 steps)
    best = min(reversed(probes[-2:]), key=lambda p: abs(p["sampled_accuracy"] - args.start_accuracy))  # ties: later
    best["picked"] = True
    if best is not probes[-1]:
        export_checkpoint(checkpoints / best["checkpoint"], paths["model"], work / "sft-model", dtype)
    print(f"rl starts from {best['checkpoint']} (sampled accuracy {best['sampled_accuracy']:.3f})", flush=True)
    (work / "probes.json").write_text(json.dumps(probes, indent=2))
    return work / "sft-model"


def reuse_or_sft(work: Path, paths: dict[str, Path], args: argparse.Namespace) -> Path:
    """--sft-model DIR: the SFT model kept there by an earlier call (the same task and seed), or SFT now and
    keep its pick there, so that modes run in separate calls start from one model."""
    kept = args.sft_model
    if kept is not None and (kept / "config.json").is_file():
        print(f"rl starts from the SFT model kept in {kept}", flush=True)
        return kept
    model = sft(work, paths, args)
    if kept is None:
        return model
    shutil.copytree(model, kept, dirs_exist_ok=True)
    shutil.copy(work / "probes.json", kept / "probes.json")
    return kept


def export_checkpoint(step_dir: Path, base: Path, dest: Path, dtype: str) -> Path:
    """A trainer checkpoint's weights as a Hugging Face model directory (the base model's config and tokenizer)."""
    model = load_causal_lm(str(base), dtype=dtype, device="cpu")
    load_model(model, str(step_dir / "model.safetensors"), strict=True)
    export_hf(model, base, dest)
    return dest


async def sampled_accuracy(model: Path, rows: list[dict[str, str]], args: argparse.Namespace) -> float:
    """The share of right answers on held-out problems, 8 samples each at temperature 1: what the RL run's
    first steps will see."""
    cfg = load_run_config(ROOT / "configs" / "scratchpad-grpo.yaml",
                          [f"rollout.model={model}", *cpu_overrides(args)]).rollout  # fmt: skip
    tokenizer: Any = AutoTokenizer.from_pretrained(str(model))
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.sampling.max_new_tokens)
    requests = [GenerationRequest(request_id=f"{i}-{k}", prompt_ids=tokenizer(r["prompt"])["input_ids"], params=params)
                for i, r in enumerate(rows) for k in range(8)]  # fmt: skip
    engine = NativeEngine(str(model), device=cfg.device, dtype=getattr(torch, cfg.dtype), max_batch=cfg.max_batch,
                          max_seq_len=cfg.max_seq_len)  # fmt: skip
    try:
        results = await engine.generate(requests)
    finally:
        await engine.close()
    texts = tokenizer.batch_decode([x.response_ids.tolist() for x in results], skip_special_tokens=True)
    labels = [r["label"] for r in rows for _ in range(8)]
    rewards = [
        scratchpad_addition(RewardInput(prompt="", response=t, label=y)) for t, y in zip(texts, labels, strict=True)
    ]
    return float(np.mean(rewards))


def run_mode(work: Path, model: Path, prompts: Path, mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    work.mkdir(parents=True, exist_ok=True)
    extra = [f"rollout.model={model}", f"trainer.model={model}", f"feeder.path={prompts}", *cpu_overrides(args),
             *MODES[mode], *args.set, f"trainer.metrics_path={work / 'metrics.jsonl'}"]  # fmt: skip
    config = str(ROOT / "configs" / "scratchpad-grpo.yaml")
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none", maxmemory="8gb")) as server:
        env = {**os.environ, "MILES_REDIS_URL": server.url, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        logs = {name: (work / f"{name}.log").open("w") for name in ("feed", "produce", "train")}
        procs = {name: subprocess.Popen([*CLI, name, "--config", config, *extra], env=env, stdout=logs[name],
                                        stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
                 for name in logs}  # fmt: skip
        metrics = work / "metrics.jsonl"
        try:
            deadline = time.monotonic() + args.first_step_s  # start-up, compilation, a first batch with signal
            while not metrics.exists() or not metrics.read_text().strip():
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                    print(f"{mode}: no training step within {args.first_step_s:.0f} s (see {work}/*.log)")
                    return []
                time.sleep(0.5)
            end = time.monotonic() + args.minutes * 60
            while time.monotonic() < end:
                if procs["train"].poll() is not None or procs["produce"].poll() is not None:
                    raise RuntimeError(f"{mode}: a process exited early (see {work}/*.log)")
                time.sleep(0.5)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            for f in logs.values():
                f.close()
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def curve(steps: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since the first step began, 5-step mean rollout accuracy)."""
    start = steps[0]["time"] - steps[0]["step_s"] - steps[0]["wait_s"]
    t = np.array([s["time"] - start for s in steps])
    acc = np.array([s["rollout_accuracy"] for s in steps])
    smooth = np.array([acc[max(0, i - 4) : i + 1].mean() for i in range(len(acc))])
    return t, smooth


def summary(steps: list[dict[str, Any]], target: float) -> dict[str, Any]:
    t, acc = curve(steps)
    hit = next((i for i in range(4, len(t)) if acc[i] >= target), None)  # a full 5-step window
    last = steps[-1]
    read = max(last.get("rollout_tokens", 0), 1)
    made = last.get("producer", {})
    return {
        "steps": len(steps),
        "wall_s": float(t[-1]),
        "step_s": float(t[-1] / len(steps)),
        "accuracy_first5": float(acc[min(4, len(acc) - 1)]),
        "accuracy_best5": float(acc.max()),
        "time_to_target_s": None if hit is None else float(t[hit]),
        "steps_to_target": None if hit is None else hit + 1,
        "trainer_wait_share": sum(s["wait_s"] for s in steps) / float(t[-1]),
        "stale_dropped": last["stale_dropped"],
        "recycled": last.get("recycled", 0),
        "wasted_token_share": last.get("stale_tokens", 0) / read,  # generated, read, never trained: stale
        "filtered_token_share": last.get("filtered_tokens", 0) / read,
        "staleness_mean": float(np.mean([s["staleness_mean"] for s in steps])),
        "response_len_mean": float(np.mean([s["response_len_mean"] for s in steps])),  # of the samples trained
        "response_len_p90_mean": float(np.mean([s.get("response_len_p90", 0) for s in steps])),
        "tokens_per_s": sum(s["tokens"] for s in steps) / float(t[-1]),
        # the producer's side: tokens generated, and partial groups recycled at weight updates and resumed
        "generated_tokens": made.get("tokens"),
        "trained_token_share": sum(s["tokens"] for s in steps) / made["tokens"] if made.get("tokens") else None,
        "partials_recycled": made.get("recycled"),
        "partials_resumed": made.get("resumed"),
    }


def aggregate(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over a mode's runs of each figure; a run that never reached the target counts as the
    slowest in the median of time and steps to it."""
    out: dict[str, Any] = {"runs": len(per_run), "reached": sum(r["time_to_target_s"] is not None for r in per_run)}
    for key in per_run[0]:
        values = [r[key] for r in per_run]
        known = [float(v) for v in values if v is not None]
        if not known:
            out[key] = None
            continue
        unreached = len(values) - len(known) if key in ("time_to_target_s", "steps_to_target") else 0
        ranked = sorted(known) + [float("inf")] * unreached
        out[key] = {"median": float(np.median(ranked)), "min": min(known), "max": max(known)}
    return out


TABLE = [  # column, key, format
    ("reached target", "reached", ""),
    ("seconds to target", "time_to_target_s", ".0f"),
    ("steps to target", "steps_to_target", ".0f"),
    ("seconds a step", "step_s", ".2f"),
    ("best 5-step accuracy", "accuracy_best5", ".2f"),
    ("trainer waiting", "trainer_wait_share", ".0%"),
    ("staleness (versions)", "staleness_mean", ".2f"),
    ("tokens read, dropped stale", "wasted_token_share", ".1%"),
    ("tokens read, filtered", "filtered_token_share", ".0%"),
    ("tokens generated, trained", "trained_token_share", ".0%"),
    ("partials recycled / resumed", "partials_recycled", ".0f"),
]


def table(modes: dict[str, dict[str, Any]], per_run: dict[str, list[dict[str, Any]]]) -> str:
    """The modes side by side, median (range) over runs, as markdown."""

    def cell(mode: str, key: str, fmt: str) -> str:
        v = modes[mode][key]
        if key == "reached":
            return f"{v} / {modes[mode]['runs']}"
        if v is None:
            return "-"
        text = (
            f"{v['median']:{fmt}} ({v['min']:{fmt}}-{v['max']:{fmt}})" if v["min"] != v["max"] else f"{v['min']:{fmt}}"
        )
        if key == "partials_recycled":
            resumed = [r["partials_resumed"] for r in per_run[mode] if r["partials_resumed"] is not None]
            text += f" / {np.median(resumed):.0f}" if resumed else ""
        return text.replace("inf", "not reached")

    head = "| mode | " + " | ".join(name for name, _, _ in TABLE) + " |"
    rule = "| --- " * (len(TABLE) + 1) + "|"
    rows = [f"| {mode} | " + " | ".join(cell(mode, k, f) for _, k, f in TABLE) + " |" for mode in modes]
    return "\n".join([head, rule, *rows]) + "\n"


def answer_lengths(out: Path) -> dict[str, Any]:
    """Tokens in the task's worked answers (one a character, plus the end of sequence): what the trained
    samples' lengths would be if long answers were trained as often as short ones."""
    path = out / "task" / "sft.jsonl"
    if not path.is_file():
        return {}
    with path.open() as f:
        lengths = [len(json.loads(line)["response"]) + 1 for line in itertools.islice(f, 20_000)]
    return {"task_answer_len": {"mean": float(np.mean(lengths)), "p90": float(np.percentile(lengths, 90))}}


def plot(runs: dict[str, list[list[dict[str, Any]]]], target: float, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU image: plot later with --replot DIR where matplotlib is installed
        print("no matplotlib: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = itertools.cycle(["tab:blue", "tab:orange", "tab:green", "tab:red"])
    for (mode, mode_runs), color in zip(runs.items(), colors, strict=False):
        curves = [curve(steps) for steps in mode_runs]
        for t, acc in curves:
            ax.plot(t, acc, color=color, alpha=0.25 if len(curves) > 1 else 1.0, linewidth=1)
        grid = np.linspace(0, min(t[-1] for t, _ in curves), 200)
        median = np.median([np.interp(grid, t, acc) for t, acc in curves], axis=0)
        ax.plot(grid, median, color=color, linewidth=2.5, label=f"{mode} ({', '.join(MODES[mode])})")
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.2f}")
    ax.set(xlabel="wall time since the first step (s)", ylabel="rollout accuracy (5-step mean)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_dir(out: Path, mode: str, index: int) -> Path:
    return out / mode / f"run-{index:02d}"


def read_runs(out: Path, modes: list[str]) -> dict[str, list[list[dict[str, Any]]]]:
    """Every run's metrics under out/MODE/run-NN (and out/MODE itself, where an older single run wrote them);
    each run's last step carries its producer's totals under "producer" (`producer_totals`)."""
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for mode in modes:
        files = sorted((out / mode).glob("run-*/metrics.jsonl")) or [out / mode / "metrics.jsonl"]
        runs[mode] = []
        for f in files:
            steps = [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []
            if steps:
                steps[-1]["producer"] = producer_totals(f.parent / "produce.log")
                runs[mode].append(steps)
    return runs


def producer_totals(log: Path) -> dict[str, int]:
    """The counters the producer logs as it stops (`producer_stopped`: groups, tokens generated, groups
    recycled as partials and resumed, ...); {} if it did not log them."""
    lines = [line for line in log.read_text().splitlines() if "producer_stopped" in line] if log.is_file() else []
    pairs = (word.split("=", 1) for word in (lines[-1].split() if lines else []) if "=" in word)
    return {key: int(value) for key, value in pairs if value.isdigit()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.1b")
    parser.add_argument("--digits", type=digit_range, default=(MIN_DIGITS, MAX_DIGITS), help="LO-HI: operand digits")
    parser.add_argument("--carry-noise", type=float, default=0.0, help="worked answers forget a carry this often")
    parser.add_argument("--sft-steps", type=int, default=700)
    parser.add_argument("--probe-every", type=int, default=25, help="SFT steps between checkpoints")
    parser.add_argument("--probe-from", type=int, default=300, help="the first SFT checkpoint probed")
    parser.add_argument("--probe-prompts", type=int, default=64)
    parser.add_argument("--start-accuracy", type=float, default=0.4, help="RL from the checkpoint nearest this")
    parser.add_argument("--sft-model", type=Path, help="keep the picked SFT model here; reuse it if it is there")
    parser.add_argument("--sft-set", action="append", default=[], help="a config override for the SFT run")
    parser.add_argument("--set", action="append", default=[], help="a config override for every RL run")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall time of each mode's RL run")
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--runs", type=int, default=1, help="runs of each mode, alternating the modes")
    parser.add_argument("--first-run", type=int, default=0, help="the index of the first run (to add runs)")
    parser.add_argument("--lock", default="", help="flock this file for each run's duration (shared machines)")
    parser.add_argument("--lock-wait-s", type=float, default=3600.0)
    parser.add_argument("--target", type=float, default=0.0)
    parser.add_argument("--cpu", action="store_true", help="everything on CPU")
    parser.add_argument("--first-step-s", type=float, default=240.0, help="give up on a mode without a step by then")
    parser.add_argument("--replot", action="store_true", help="only summarise and plot the runs already in --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not args.replot:
        paths = write_task(args.out / "task", size=args.size, digits=args.digits, carry_noise=args.carry_noise)
        with cpu_lock(args.lock, args.lock_wait_s) if args.lock else contextlib.nullcontext(0.0):
            model = reuse_or_sft(args.out, paths, args)
        for index in range(args.first_run, args.first_run + args.runs):
            for mode in modes:
                with cpu_lock(args.lock, args.lock_wait_s) if args.lock else contextlib.nullcontext(0.0):
                    steps = run_mode(run_dir(args.out, mode, index), model, paths["prompts"], mode, args)
                print(f"{mode} run {index}: {len(steps)} steps", flush=True)
    runs = {mode: mode_runs for mode, mode_runs in read_runs(args.out, modes).items() if mode_runs}
    if not runs:
        raise SystemExit("no mode trained a step")
    curves = [curve(steps)[1] for mode_runs in runs.values() for steps in mode_runs]
    first5 = float(np.median([c[min(4, len(c) - 1)] for c in curves]))
    target = args.target or (first5 + float(np.median([c.max() for c in curves]))) / 2
    ran = {k: str(v) for k, v in vars(args).items()}
    if args.replot and (args.out / "result.json").is_file():  # the arguments of the run, not of the replot
        ran = json.loads((args.out / "result.json").read_text()).get("args", ran)
    per_run = {mode: [summary(steps, target) for steps in mode_runs] for mode, mode_runs in runs.items()}
    result = {"target": target, "args": ran, **answer_lengths(args.out),
              "modes": {mode: aggregate(rows) for mode, rows in per_run.items()}, "per_run": per_run}  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    (args.out / "table.md").write_text(
        f"Target {target:.3f}; median (range) over runs.\n\n" + table(result["modes"], per_run)
    )
    where = "two CPU cores" if args.cpu or ran.get("cpu") == "True" else "one GPU"
    plot(runs, target, args.out / "accuracy.png", f"scratchpad addition: GRPO from the SFT model, {where}")
    print(json.dumps(result["modes"], indent=2))


if __name__ == "__main__":
    main()
