"""Trainer tokens/s and peak memory on CPU: optimizer steps of the torch trainer on fixed synthetic batches.

    python bench/bench_trainer_cpu.py [--groups 8] [--samples 8] [--prompt-len 32] [--response-len 96]
                                [--micro-batch-tokens 8192] [--steps 5] [--sizes NAME ...] [--json-out FILE]

Each size runs in a fresh process (peak RSS is per process). Tokens counted are prompt + response tokens
through the forward and backward pass; one step = one rollout batch, one optimizer step (recomputed old
logprobs are free with one update per batch). Peak memory is the process's max RSS, model load included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import collate
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.policy import PolicyTrainer

SIZES = {
    "tiny-dense": TinyModelConfig(kind="dense", max_position=1024),
    "tiny-moe": TinyModelConfig(kind="moe", max_position=1024),
    "small-dense": TinyModelConfig(
        kind="dense",
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=768,
        max_position=1024,
    ),
}


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(tmp, SIZES[name])
        model = AutoModelForCausalLM.from_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(args.groups):
        g = synthetic_group(rng, n_samples=args.samples, prompt_len=args.prompt_len, response_len=args.response_len,
                            vocab=vocab)  # fmt: skip
        samples = tuple(replace(s, logprobs=np.full(s.num_tokens, -3.0, np.float32)) for s in g.samples)
        groups.append(replace(g, samples=samples))
    batch = collate(groups)
    config = TrainerConfig(lr=1e-5, micro_batch_tokens=args.micro_batch_tokens)
    trainer = PolicyTrainer(model, config, AlgoConfig(tis_mode="truncate"), temperature=1.0)
    trainer.train(batch)  # warm-up
    tokens, elapsed = 0.0, 0.0
    for _ in range(args.steps):
        t = time.perf_counter()
        out = trainer.train(batch)
        elapsed += time.perf_counter() - t
        tokens += out["tokens"]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": name,
        "params": params,
        "tokens_per_step": tokens / args.steps,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / args.steps,
        "peak_rss_mib": round(peak_mib, 1),
    }


def _child(name: str, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(args.threads)
    queue.put(run(name, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=96)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--json-out")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for name in args.sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        r = results[-1]
        print(f"{name:12s} {r['params'] / 1e6:6.2f}M params  {r['tokens_per_s']:9.0f} tokens/s  "
              f"{r['step_s']:.3f} s/step  peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
