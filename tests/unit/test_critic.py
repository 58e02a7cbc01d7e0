"""PPO with a critic on a tiny model (CPU): the value model reads the right positions, learns the returns,
trains alone for num_critic_only_steps, and is checkpointed and restored with its optimizer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from miles_stream.errors import MilesStreamError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.run_config import load_run_config
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.build import build_trainer
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs
from miles_stream.trainer.torch.policy import PolicyTrainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig())


def ppo_trainer(model_dir: Path, *overrides: str) -> PolicyTrainer:
    config = load_run_config(None, [f"trainer.model={model_dir}", "algo.advantage_estimator=ppo", "trainer.lr=1e-3",
                                    "trainer.torch_threads=1", *overrides])  # fmt: skip
    return build_trainer(config.trainer, config.algo, temperature=config.trainer_temperature, parallel=DataParallel())


def batch_for(model: torch.nn.Module, seed: int = 0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(3):
        g = synthetic_group(rng, n_samples=4, prompt_len=4, response_len=int(rng.integers(3, 9)), vocab=50)
        samples = tuple(replace(s, reward=r) for s, r in zip(g.samples, (1.0, 0.0, 0.5, 2.0), strict=True))
        groups.append(replace(g, samples=samples))
    b = collate(groups)
    with torch.no_grad():
        logp, _ = response_logprobs(model, micro_inputs(b, "cpu"), temperature=1.0)
    return RolloutBatch(b.prompts, b.responses, logp * b.mask_BT, b.mask_BT, b.rewards_B, b.group_B)


def test_values_are_read_where_the_next_response_token_is_predicted(model_dir: Path) -> None:
    trainer = ppo_trainer(model_dir)
    critic = trainer.critic
    assert critic is not None
    with torch.no_grad():
        critic.model.head.weight.normal_()
    batch = batch_for(trainer.model)
    values = critic.values(batch, trainer._plan, trainer._inputs, trainer._precision)
    i, p, n = 1, len(batch.prompts[1]), len(batch.responses[1])
    ids = torch.tensor(np.concatenate([batch.prompts[1], batch.responses[1]]), dtype=torch.long)[None]
    with torch.no_grad():
        hidden = critic.model.decoder(input_ids=ids).last_hidden_state[0]
        expected = critic.model.head(hidden[p - 1 : p - 1 + n]).squeeze(-1)
    torch.testing.assert_close(values[i, :n], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(values * (1 - batch.mask_BT), torch.zeros_like(values))


def test_the_critic_learns_the_returns(model_dir: Path) -> None:
    trainer = ppo_trainer(model_dir, "trainer.critic_lr=1e-2", "algo.value_clip=null")
    batch = batch_for(trainer.model)
    losses = [trainer.train(batch)["value_loss"] for _ in range(30)]
    assert losses[-1] < 0.3 * losses[0]


def test_only_the_critic_learns_for_num_critic_only_steps(model_dir: Path) -> None:
    trainer = ppo_trainer(model_dir, "algo.num_critic_only_steps=2")
    assert trainer.critic is not None
    policy = [p.detach().clone() for p in trainer.model.parameters()]
    batch = batch_for(trainer.model)
    for step in range(3):
        head = trainer.critic.model.head.weight.detach().clone()
        metrics = trainer.train(batch)
        unchanged = all(torch.equal(a, b) for a, b in zip(policy, trainer.model.parameters(), strict=True))
        assert unchanged == (step < 2) and metrics["critic_only"] == float(step < 2)
        assert not torch.equal(head, trainer.critic.model.head.weight)


def test_the_critic_is_checkpointed_with_its_optimizer(model_dir: Path, tmp_path: Path) -> None:
    trainer = ppo_trainer(model_dir)
    assert trainer.critic is not None
    batch = batch_for(trainer.model)
    trainer.train(batch)
    state = TrainerState(step=1, version=1, claims=())
    save_checkpoint(tmp_path, state, trainer.save)
    fresh = ppo_trainer(model_dir)
    assert fresh.critic is not None
    load_checkpoint(tmp_path, fresh.load)
    for a, b in zip(trainer.critic.model.state_dict().values(), fresh.critic.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh.critic.steps == trainer.critic.steps == 1
    out_a, out_b = trainer.train(batch), fresh.train(batch)  # the same next step: the optimizer state came back
    assert out_a["value_loss"] == pytest.approx(out_b["value_loss"], rel=1e-6)
    plain_config = load_run_config(None, [f"trainer.model={model_dir}"])
    plain = build_trainer(plain_config.trainer, plain_config.algo, temperature=1.0, parallel=DataParallel())
    save_checkpoint(tmp_path / "plain", state, plain.save)
    with pytest.raises(MilesStreamError, match="holds no critic"):
        load_checkpoint(tmp_path / "plain", fresh.load)


def test_ppo_needs_its_critic_and_only_ppo_has_one(model_dir: Path) -> None:
    trainer = ppo_trainer(model_dir)
    with pytest.raises(ValueError, match="needs a critic"):
        PolicyTrainer(trainer.model, trainer.config, AlgoConfig(advantage_estimator="ppo"), temperature=1.0)
    with pytest.raises(ValueError, match="needs a critic"):
        PolicyTrainer(trainer.model, trainer.config, AlgoConfig(), temperature=1.0, critic=trainer.critic)
