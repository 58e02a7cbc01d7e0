"""The demo's recipe without the pipeline: synchronous GRPO on the demo task in one process, counting the
groups generated until greedy accuracy reaches 0.9. Used to choose the demo's model init and group size.

    python bench/bench_demo_recipe.py [--seeds 0,1,2,3,4,5] [--samples 32] [--init-std 0.1] [--batch 16]
                                [--max-groups 30000] [--sft] [--json-out FILE]

Each step samples one answer token per row from the policy (at the demo's temperature), keeps groups whose
rewards differ (the demo's `reward_variance` filter) until it has `--batch` of them, and trains on them with
the project's `PolicyTrainer` and the demo config's algorithm and learning rate. Seeds change the prompt order and the
sampling; the model is the demo's (built from its own seed). `--sft` instead trains on the right answers
(cross-entropy, 16 prompts a step): whether the model can learn the table at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.config import build, load_yaml
from miles_stream.demo.task import MODEL, greedy_accuracy, rows
from miles_stream.models import build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.policy import PolicyTrainer

DEMO = Path(__file__).parent.parent / "configs" / "demo.yaml"


@dataclasses.dataclass
class Generated:
    groups: int = 0  # groups sampled so far, kept or not


def grpo_steps(model: Any, tok: Any, seed: int, *, batch: int, samples: int, generated: Generated,
               max_groups: float = float("inf")) -> Iterator[tuple[int, list[torch.Tensor]]]:  # fmt: skip
    """Synchronous GRPO a step at a time: sample one answer token per row (`samples` a prompt, at the demo's
    temperature), keep groups whose rewards differ until `batch` are kept, train on them with the demo config's
    algorithm and learning rate; yields (step, the kept groups' rewards). Ends when `max_groups` run out first."""
    config = load_yaml(DEMO)
    algo = build(AlgoConfig, config["algo"], "algo")
    temperature = config["rollout"]["sampling"]["temperature"]
    trainer = PolicyTrainer(model, TrainerConfig(lr=config["trainer"]["lr"], seed=seed), algo, temperature=temperature)
    prompts, labels = _tensors(tok)
    rng, order = np.random.default_rng(seed), []
    for step in itertools.count(1):
        kept: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        while len(kept) < batch and generated.groups < max_groups:
            order = order or list(rng.permutation(len(labels)))
            idx = [order.pop() for _ in range(min(len(order), 32))]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=prompts[idx]).logits[:, -1] / temperature, -1)
            picks = torch.multinomial(logp.exp(), samples, replacement=True)
            for j, i in enumerate(idx):
                generated.groups += 1
                reward = (picks[j] == labels[i]).float()
                if reward.std() > 0 and len(kept) < batch:
                    kept.append((i, picks[j], logp[j, picks[j]], reward))
        if len(kept) < batch:
            return
        n = samples
        trainer.train(RolloutBatch(
            prompts=[prompts[i].numpy() for i, *_ in kept for _ in range(n)],
            responses=[np.array([t]) for _, p, *_ in kept for t in p.tolist()],
            logp_rollout_BT=torch.cat([lp for _, _, lp, _ in kept])[:, None],
            mask_BT=torch.ones(len(kept) * n, 1),
            rewards_B=torch.cat([r for *_, r in kept]),
            group_B=torch.arange(len(kept)).repeat_interleave(n),
        ))  # fmt: skip
        yield step, [r for *_, r in kept]


def grpo(model: Any, tok: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    generated, step = Generated(), 0
    for step, _ in grpo_steps(model, tok, seed, batch=args.batch, samples=args.samples, generated=generated,
                              max_groups=args.max_groups):  # fmt: skip
        if step % 10 == 0 and greedy_accuracy(model.eval(), tok) >= 0.9:
            return {"seed": seed, "reached": True, "steps": step, "groups": generated.groups}
    return {"seed": seed, "reached": False, "steps": step, "groups": generated.groups}


def sft(model: Any, tok: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    prompts, labels = _tensors(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, 2001):
        idx = torch.randint(0, len(labels), (16,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(input_ids=prompts[idx]).logits[:, -1], labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 and greedy_accuracy(model, tok) >= 0.9:
            return {"seed": seed, "reached": True, "steps": step}
    return {"seed": seed, "reached": False, "steps": 2000, "accuracy": greedy_accuracy(model, tok)}


def _tensors(tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = rows()
    prompts = torch.tensor([tok(p)["input_ids"] for p, _ in data])
    labels = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for _, a in data])
    return prompts, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--init-std", type=float, default=MODEL.init_std)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-groups", type=int, default=30_000)
    parser.add_argument("--sft", action="store_true")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp), dataclasses.replace(MODEL, init_std=args.init_std))
        tok = AutoTokenizer.from_pretrained(model_dir)
        results = []
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            results.append((sft if args.sft else grpo)(model, tok, seed, args))
            print(json.dumps(results[-1]), flush=True)
    summary = {"args": vars(args), "reached": sum(r["reached"] for r in results), "runs": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
