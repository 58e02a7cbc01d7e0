"""AdamW and its learning-rate schedule: linear warm-up, then constant or cosine decay to `min_lr`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from miles_stream.trainer.config import TrainerConfig


def adamw_options(trained: list[torch.nn.Parameter], config: TrainerConfig) -> dict[str, Any]:
    """AdamW's hyperparameters from the config; on CUDA its fused kernel (one launch for every parameter),
    elsewhere the foreach one."""
    cuda = bool(trained) and all(p.is_cuda for p in trained)
    return dict(lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay,
                foreach=None if cuda else True, fused=True if cuda else None)  # fmt: skip


def build_optimizer(params: Iterable[torch.nn.Parameter], config: TrainerConfig) -> torch.optim.AdamW:
    trained = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(trained, **adamw_options(trained, config))


def lr_factor(step: int, config: TrainerConfig) -> float:
    """The learning rate at optimizer step `step` (0-based), as a fraction of `config.lr`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay = config.decay_steps or config.max_steps * config.updates_per_batch - config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(decay, 1))
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, config))
