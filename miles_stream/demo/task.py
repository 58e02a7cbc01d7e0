"""The demo's task: single-digit addition mod 10 ("7+8=" -> "5"), 100 prompts, and its tiny model.

The model's vocabulary is the 12 characters the task uses plus 4 special tokens, so an untrained policy
answers right about 1 time in 16. Its weights start at std 0.1, not the 0.02 of large models: at 0.02 a model
this narrow starts so close to symmetric that even supervised training on the 100 answers stalls below 0.5 in
one run of three (docs/benchmarks.md, "The demo learns"). `greedy_accuracy` scores a policy on all
100 prompts with its most likely answer: the number the demo reports as accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from miles_stream.models import TinyModelConfig, build_tiny_model

CHARSET = "0123456789+="
MODEL = TinyModelConfig(
    kind="dense", charset=CHARSET, hidden_size=64, intermediate_size=128, num_layers=2, init_std=0.1, seed=0
)
# The same task's model as vLLM can serve it on CPU: its CPU attention needs head_dim >= 32 (MODEL's is 16),
# and a reload from disk leaves a tied output head stale, so the head is a weight of its own (docs/vllm.md).
VLLM_MODEL = dataclasses.replace(MODEL, num_heads=2, num_kv_heads=1, tie_embeddings=False)


def rows() -> list[tuple[str, str]]:
    return [(f"{a}+{b}=", str((a + b) % 10)) for a in range(10) for b in range(10)]


def write_task(work: Path, model: TinyModelConfig = MODEL) -> tuple[Path, Path]:
    """Build the model and the dataset under `work`; returns (model dir, prompts JSONL)."""
    model_dir = build_tiny_model(work / "model", model)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "label": label}) + "\n" for p, label in rows()))
    return model_dir, prompts


@torch.no_grad()
def greedy_accuracy(model: Any, tokenizer: Any) -> float:
    """Share of the 100 prompts whose most likely next token is the right digit."""
    data = rows()
    ids = torch.tensor([tokenizer(p)["input_ids"] for p, _ in data])  # every prompt is 4 tokens
    best = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    answers = tokenizer.batch_decode([[t] for t in best], skip_special_tokens=True)
    right: int = sum(a == label for a, (_, label) in zip(answers, data, strict=True))
    return right / len(data)
