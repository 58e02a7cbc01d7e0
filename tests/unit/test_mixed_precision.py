"""bf16 training over float32 main params (trainer.main_params_dtype): what an RL learning rate needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs
from miles_stream.trainer.torch.policy import PolicyTrainer
from miles_stream.weights.background import _copy_into


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig())


def batch_for(model: torch.nn.Module) -> RolloutBatch:
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(4):
        g = synthetic_group(rng, n_samples=4, prompt_len=5, response_len=8, vocab=50)
        samples = tuple(replace(s, reward=r) for s, r in zip(g.samples, (0.0, 1.0, 0.0, 1.0), strict=True))
        groups.append(replace(g, samples=samples))
    b = collate(groups)
    with torch.no_grad():
        logp, _ = response_logprobs(model, micro_inputs(b, "cpu"), temperature=1.0)
    return RolloutBatch(b.prompts, b.responses, logp.float() * b.mask_BT, b.mask_BT, b.rewards_B, b.group_B)


def changed_share(model_dir: Path, main: str) -> float:
    """The share of weight-matrix elements one step at lr 1e-6 moves, bf16 compute over `main` main params."""
    config = TrainerConfig(model=str(model_dir), dtype="bfloat16", main_params_dtype=main, lr=1e-6)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = load_causal_lm(str(model_dir), dtype=config.params_dtype, device="cpu")
    trainer = PolicyTrainer(model, config, AlgoConfig(), temperature=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}
    trainer.train(batch_for(model))
    after = dict(model.named_parameters())
    moved = sum(int((after[n].detach() != w).sum()) for n, w in before.items())
    return moved / sum(w.numel() for w in before.values())


def test_float32_main_params_keep_updates_that_bf16_params_lose(model_dir: Path) -> None:
    # a weight near 0.02 has a bf16 spacing of 1.2e-4: a 1e-6 step rounds away in bf16, not in float32
    assert changed_share(model_dir, "float32") > 0.9
    assert changed_share(model_dir, "bfloat16") < 0.1


def test_mixed_precision_computes_in_bf16_and_publishes_bf16(model_dir: Path) -> None:
    config = TrainerConfig(model=str(model_dir), dtype="bfloat16", lr=1e-4)
    assert config.params_dtype == "float32"
    model = load_causal_lm(str(model_dir), dtype=config.params_dtype, device="cpu")
    trainer = PolicyTrainer(model, config, AlgoConfig(), temperature=1.0)
    assert trainer.compute_dtype is torch.bfloat16
    batch = batch_for(model)
    bf16 = load_causal_lm(str(model_dir), dtype="bfloat16", device="cpu")
    expected = batch_for(bf16).logp_rollout_BT
    got = trainer._logprobs(model, batch)
    assert (got - expected).abs().max() < 0.1  # the same bf16 arithmetic, up to where autocast casts
    assert (got - batch.logp_rollout_BT).abs().max() > 0  # and not the float32 forward
    metrics = trainer.train(batch)
    assert np.isfinite(metrics["loss"]) and all(p.dtype == torch.float32 for p in model.parameters())
    snapshot: dict[str, torch.Tensor] = {}
    _copy_into(snapshot, model.state_dict(), trainer.compute_dtype, None)
    assert {t.dtype for t in snapshot.values()} == {torch.bfloat16}
    assert all(torch.equal(snapshot[n], t.to(torch.bfloat16)) for n, t in model.state_dict().items())


def test_bf16_main_params_need_bf16_compute() -> None:
    with pytest.raises(ConfigError, match="main_params_dtype"):
        TrainerConfig(dtype="float32", main_params_dtype="bfloat16")
