"""What a checkpoint holds for the torch backend (trainer/checkpoint.py writes the rest and the protocol):

model.safetensors   the policy's parameters and buffers
critic.safetensors  PPO's value model (only with a critic)
state.pt            AdamW, schedule and torch RNG state (loaded weights_only); the critic's optimizer too
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn


def write_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any = None) -> None:
    save_model(model, str(directory / "model.safetensors"))
    extra = {}
    if critic is not None:  # PPO's value model (critic.py), its optimizer and schedule
        save_model(critic.model, str(directory / "critic.safetensors"))
        extra = {"critic_optimizer": critic.optimizer.state_dict(), "critic_scheduler": critic.scheduler.state_dict()}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), **extra}, directory / "state.pt")  # fmt: skip


def read_state(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, critic: Any = None) -> None:
    load_model(model, str(directory / "model.safetensors"), strict=True)  # strict: a missing name raises
    saved = torch.load(directory / "state.pt", weights_only=True)
    if critic is not None:
        if not (directory / "critic.safetensors").is_file():
            raise ValueError("it holds no critic (saved by a run without algo.advantage_estimator=ppo)")
        load_model(critic.model, str(directory / "critic.safetensors"), strict=True)
        critic.optimizer.load_state_dict(saved["critic_optimizer"])
        critic.scheduler.load_state_dict(saved["critic_scheduler"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
