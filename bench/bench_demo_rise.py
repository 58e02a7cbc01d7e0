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
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_demo_recipe import DEMO, _tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.config import build, load_yaml
from miles_stream.demo.task import MODEL, VLLM_MODEL, greedy_accuracy
from miles_stream.models import build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.policy import PolicyTrainer

RISE = 0.15


def run(model: Any, tok: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    config = load_yaml(DEMO)
    algo = build(AlgoConfig, config["algo"], "algo")
    temperature = config["rollout"]["sampling"]["temperature"]
    trainer = PolicyTrainer(model, TrainerConfig(lr=config["trainer"]["lr"], seed=seed), algo, temperature=temperature)
    prompts, labels = _tensors(tok)
    rng, order, means, rise = np.random.default_rng(seed), [], [], None
    n = args.samples
    for step in range(1, args.steps + 1):
        kept: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        while len(kept) < args.batch:
            order = order or list(rng.permutation(len(labels)))
            idx = [order.pop() for _ in range(min(len(order), 32))]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=prompts[idx]).logits[:, -1] / temperature, -1)
            picks = torch.multinomial(logp.exp(), n, replacement=True)
            for j, i in enumerate(idx):
                reward = (picks[j] == labels[i]).float()
                if reward.std() > 0 and len(kept) < args.batch:
                    kept.append((i, picks[j], logp[j, picks[j]], reward))
        means.append(float(np.mean([r.mean().item() for *_, r in kept])))
        trainer.train(RolloutBatch(
            prompts=[prompts[i].numpy() for i, *_ in kept for _ in range(n)],
            responses=[np.array([t]) for _, p, *_ in kept for t in p.tolist()],
            logp_rollout_BT=torch.cat([lp for _, _, lp, _ in kept])[:, None],
            mask_BT=torch.ones(len(kept) * n, 1),
            rewards_B=torch.cat([r for *_, r in kept]),
            group_B=torch.arange(len(kept)).repeat_interleave(n),
        ))  # fmt: skip
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
