"""How soon the demo's recipe raises the sampled reward, per group count: synchronous GRPO on the demo task in one
process (as bench_demo_recipe.py), counting the steps until the vLLM learning test's criterion holds: the mean
reward of the last 5 steps' groups 0.15 above the first 5 steps'. Used to choose that test's groups a step.

    python bench/bench_demo_rise.py [--model vllm|demo] [--batch 8] [--samples 32] [--steps 60] [--seeds 0,...,9]

`--model vllm` is demo/task.py's VLLM_MODEL (2 heads of 32, its own head), `demo` the demo's own. A step's
reward is the mean over the groups it trains on (those whose rewards differ), as the trainer's rollout_reward.
One JSON line per seed: the step the criterion first held (null: not within --steps) and the final greedy accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_demo_recipe import Generated, grpo_steps
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.demo.task import MODEL, VLLM_MODEL, greedy_accuracy
from miles_stream.models import build_tiny_model

RISE = 0.15


def run(model: Any, tok: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    means: list[float] = []
    rise = None
    steps = grpo_steps(model, tok, seed, batch=args.batch, samples=args.samples, generated=Generated())
    for step, rewards in itertools.islice(steps, args.steps):
        means.append(float(np.mean([r.mean().item() for r in rewards])))
        if rise is None and len(means) >= 10 and np.mean(means[-5:]) >= np.mean(means[:5]) + RISE:
            rise = step
    return {"seed": seed, "rise_step": rise, "accuracy": greedy_accuracy(model.eval(), tok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vllm", "demo"), default="vllm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp), VLLM_MODEL if args.model == "vllm" else MODEL)
        tok = AutoTokenizer.from_pretrained(model_dir)
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            print(json.dumps({"model": args.model, "batch": args.batch, **run(model, tok, seed, args)}), flush=True)


if __name__ == "__main__":
    main()
