"""Building the trainer's pieces from a `RunConfig`: for the process entry point and for tests."""

from __future__ import annotations

from typing import Any

import torch

from miles_stream.buffer import ReplayBuffer
from miles_stream.run_config import RunConfig
from miles_stream.trainer.critic import Critic, ValueModel
from miles_stream.trainer.hf import export_hf, load_causal_lm
from miles_stream.trainer.metrics import MetricsSink
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.service import TrainerService
from miles_stream.trainer.step import PolicyTrainer
from miles_stream.weights.versions import WeightPublisher, WeightSubscriber


def load_policy(config: RunConfig) -> Any:
    """trainer.model, loaded after the trainer's seed and thread count are set (RL and SFT alike)."""
    cfg = config.trainer
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    return load_causal_lm(cfg.model, dtype=cfg.params_dtype, device=cfg.device)


def build_trainer(config: RunConfig, parallel: DataParallel) -> PolicyTrainer:
    cfg = config.trainer
    model = load_policy(config)
    needs_ref = config.algo.kl_loss_coef > 0 or config.algo.kl_coef > 0
    ref = load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype, device=cfg.device) if needs_ref else None
    teacher = load_causal_lm(cfg.teacher_model, dtype=cfg.dtype, device=cfg.device) if config.algo.use_opd else None
    for frozen in (ref, teacher):
        if frozen is not None:
            frozen.requires_grad_(False).train(False)
    critic = None
    if config.algo.advantage_estimator == "ppo":
        lm = load_causal_lm(cfg.critic_model or cfg.model, dtype=cfg.params_dtype, device=cfg.device)
        critic = Critic(ValueModel(lm), cfg, config.algo, parallel)
    return PolicyTrainer(model, cfg, config.algo, temperature=config.trainer_temperature, ref_model=ref,
                         teacher_model=teacher, critic=critic, parallel=parallel)  # fmt: skip


def build_service(config: RunConfig, trainer: PolicyTrainer, buffer: ReplayBuffer, publisher: WeightPublisher | None,
             subscriber: WeightSubscriber | None) -> TrainerService:  # fmt: skip
    cfg = config.trainer
    metrics = MetricsSink(cfg.metrics_path, cfg.tensorboard_dir) if trainer.parallel.is_main else MetricsSink()
    return TrainerService(cfg, trainer=trainer, buffer=buffer, publisher=publisher, subscriber=subscriber,
                          metrics=metrics, export=lambda m, dest: export_hf(m, cfg.model, dest))  # fmt: skip
