"""One GPU, rollout and training side by side: how much do they overlap, in one process or in two?

    python bench/bench_colocate.py [--case gpu] [--rounds 3] [--json-out FILE]

Same model and shapes as `bench/bench_pipeline.py --case gpu`. Measures, after warm-ups:
- `generate_s`: one producer batch (max_inflight_prompts x samples rows, the answer length) on the engine alone;
- `train_s`: one training step of a rollout batch alone;
- `one_process_s`: both at once in this process, the trainer on a CUDA stream of its own while the engine's
  thread decodes (CUDA graphs) on its stream: kernels of both may run on the GPU at the same time;
- `two_processes_s`: both at once, the trainer in a child process (its own CUDA context, as the CLI runs them):
  without MPS the GPU time-slices between contexts.
`overlap` = (generate_s + train_s - concurrent) / min(generate_s, train_s): 1 = the shorter is fully hidden.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from bench_pipeline import (  # bench/bench_pipeline.py, beside this script
    CASES,
    CONFIG,
    GPU_MODEL,
    _long_prompts,
    _prompt_ids,
    overrides,
    synthetic_batch,
)

from miles_stream.demo.task import write_task
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import build_tiny_model
from miles_stream.rollout import GenerationRequest, SamplingParams
from miles_stream.run_config import load_run_config
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.build import build_trainer


def _trainer_and_batch(cfg: Any, prompt_len: int) -> tuple[Any, Any]:
    trainer = build_trainer(cfg.trainer, cfg.algo, temperature=cfg.trainer_temperature, parallel=DataParallel())
    return trainer, synthetic_batch(cfg, prompt_len, int(trainer.model.config.vocab_size))


def _train_child(cfg: Any, prompt_len: int, rounds: int, ready: Any, go: Any, done: Any) -> None:
    trainer, batch = _trainer_and_batch(cfg, prompt_len)
    trainer.train(batch)
    torch.cuda.synchronize()
    ready.set()
    for _ in range(rounds):
        go.wait()
        go.clear()
        trainer.train(batch)
        torch.cuda.synchronize()
        done.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="gpu", choices=[c for c in CASES if c.startswith("gpu")])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups-per-step", type=int, default=16, help="as bench_pipeline.py (the tables: 16)")
    parser.add_argument("--samples-per-group", type=int, default=8, help="as bench_pipeline.py (the tables: 8)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="miles-colocate-"))
    _, prompts = write_task(root / "task")
    model = build_tiny_model(root / "task" / "gpu-model", GPU_MODEL)
    if CASES[args.case]["prompt_len"]:
        prompts = _long_prompts(root / "long.jsonl", CASES[args.case]["prompt_len"])
    ns = argparse.Namespace(steps=1, transport="redis", groups_per_step=args.groups_per_step,
                            samples_per_group=args.samples_per_group)  # fmt: skip
    cfg = load_run_config(CONFIG, overrides(args.case, ns, root, model, prompts, "async"))
    ids = _prompt_ids(model, prompts)
    r = cfg.rollout
    engine = NativeEngine(str(model), device="cuda", dtype=torch.bfloat16, max_batch=r.max_batch,
                          max_seq_len=r.max_seq_len)  # fmt: skip
    rows = min(r.max_inflight_prompts * r.n_samples_per_prompt, r.max_batch)
    params = SamplingParams(temperature=1.0, max_new_tokens=r.sampling.max_new_tokens, ignore_eos=True)
    requests = [GenerationRequest(request_id=f"r{i}", prompt_ids=ids[i % len(ids)], params=params)
                for i in range(rows)]  # fmt: skip

    def generate() -> float:
        started = time.perf_counter()
        asyncio.run(engine.generate(requests))
        return time.perf_counter() - started

    trainer, batch = _trainer_and_batch(cfg, len(ids[0]))
    side = torch.cuda.Stream()

    def train() -> float:
        started = time.perf_counter()
        with torch.cuda.stream(side):
            trainer.train(batch)
        side.synchronize()
        return time.perf_counter() - started

    generate(), train()  # warm-ups: graphs, compile
    result: dict[str, Any] = {"case": args.case, "rows": rows}
    result["generate_s"] = min(generate() for _ in range(args.rounds))
    result["train_s"] = min(train() for _ in range(args.rounds))
    together = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        t = threading.Thread(target=train)
        t.start()
        generate()
        t.join()
        together.append(time.perf_counter() - started)
    result["one_process_s"] = min(together)
    ctx = mp.get_context("spawn")
    ready, go, done = ctx.Event(), ctx.Event(), ctx.Event()
    child = ctx.Process(target=_train_child, args=(cfg, len(ids[0]), args.rounds, ready, go, done))
    child.start()
    ready.wait(600)
    apart = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        go.set()
        generate()
        done.wait(600)
        done.clear()
        apart.append(time.perf_counter() - started)
    child.join(60)
    result["two_processes_s"] = min(apart)
    asyncio.run(engine.close())
    shorter, total = min(result["generate_s"], result["train_s"]), result["generate_s"] + result["train_s"]
    for key in ("one_process_s", "two_processes_s"):
        result[key.replace("_s", "_overlap")] = (total - result[key]) / shorter
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
