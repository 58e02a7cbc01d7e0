"""The trainer on a GPU: compiled decoder layers and the Triton logprob kernel take the eager step."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import collate
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.policy import PolicyTrainer

# Compiling 28-layer steps on a cold compile cache takes minutes: a bound, not the default 120 s.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(900),
]


def variable_batch(vocab: int) -> Any:
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(4):
        g = synthetic_group(rng, n_samples=4, prompt_len=int(rng.integers(2, 9)), response_len=int(rng.integers(3, 12)),
                            vocab=vocab)  # fmt: skip
        groups.append(replace(g, samples=tuple(replace(s, logprobs=np.full(s.num_tokens, -3.0, np.float32))
                                               for s in g.samples)))  # fmt: skip
    return collate(groups)


def steps(base: Any, batch: Any, *variants: dict[str, Any]) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """(loss, gradients) of one step from `base` under each variant of the trainer config."""
    results = []
    for options in variants:
        model = copy.deepcopy(base).cuda()
        trainer = PolicyTrainer(model, TrainerConfig(lr=1e-3, device="cuda", **options),
                                AlgoConfig(entropy_coef=0.01), temperature=0.8)  # fmt: skip
        results.append((trainer.train(batch)["loss"], {n: p.grad.float().clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}))  # fmt: skip
    return results


def test_compiled_layers_and_fused_logprobs_take_the_eager_full_logits_step(tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path, TinyModelConfig(kind="dense")))
    batch = variable_batch(base.config.vocab_size)
    (loss, eager), *others = steps(base, batch, {"fused_logprobs": False}, {"compile": True},
                                   {"compile": True, "pack_sequences": True})  # fmt: skip
    for other_loss, other in others:
        assert eager.keys() == other.keys() and eager
        assert abs(loss - other_loss) < 1e-4
        for name, value in eager.items():
            torch.testing.assert_close(other[name], value, atol=1e-5, rtol=1e-3)


def test_packed_bf16_step_through_varlen_flash_attention_takes_the_padded_step(tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path, TinyModelConfig(kind="dense")),
                                                dtype=torch.bfloat16)  # fmt: skip
    batch = variable_batch(base.config.vocab_size)
    (loss, padded), (packed_loss, packed) = steps(base, batch, {}, {"pack_sequences": True, "compile": True})
    assert abs(loss - packed_loss) < 2e-2
    for name, value in padded.items():
        assert (packed[name] - value).norm() <= 0.05 * value.norm() + 1e-6, name


def test_routing_replay_inside_compiled_layers_takes_the_eager_step(tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path, TinyModelConfig(kind="moe")))
    batch = variable_batch(base.config.vocab_size)
    rng = np.random.default_rng(1)
    traces = [np.argsort(rng.random((n - 1, 2, 8)), -1)[..., :2].astype(np.uint8) for n in batch.lengths]
    batch = replace(batch, routing=traces)  # distinct experts per token, 2 layers, top-2
    (_, free), (loss, eager), (compiled_loss, compiled) = steps(
        base, batch, {}, {"routing_replay": True}, {"routing_replay": True, "compile": True}
    )
    moved = max(float((free[n] - g).norm() / (g.norm() + 1e-12)) for n, g in eager.items())
    assert moved > 0.1  # the replayed (random) experts change the gradients: replay is on
    assert abs(loss - compiled_loss) < 1e-4
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, atol=1e-5, rtol=1e-3)
