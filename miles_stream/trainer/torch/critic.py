"""The PPO critic (`algo.advantage_estimator: ppo`): a value model and its update, beside the policy.

    ValueModel   a causal LM's decoder (trainer.critic_model, else trainer.model) and a scalar head, zero at
                 first; V_t is read at the position that predicts response token t (the state before it)
    Critic       its own AdamW (trainer.critic_lr, else trainer.lr) and schedule; each batch:
                 values(batch)  V_old [B, T] before any update (GAE's input and the value clip's centre)
                 update(batch)  ½·max((V − R)², (V_clip − R)²), token mean over the batch, one optimizer step
For the first `algo.num_critic_only_steps` batches only the critic learns (the trainer skips the policy's
step). Shapes as in batch.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from miles_stream.trainer import losses
from miles_stream.trainer import reductions as red
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.inputs import MicroInputs
from miles_stream.trainer.torch.logprobs import response_hidden
from miles_stream.trainer.torch.optim import build_optimizer, build_scheduler

Plan = Callable[[Sequence[int]], list[list[int]]]
Inputs = Callable[[RolloutBatch], MicroInputs]


class ValueModel(nn.Module):
    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.decoder = lm.base_model  # the output layer is not needed
        weight = lm.get_output_embeddings().weight
        self.head = nn.Linear(int(lm.config.hidden_size), 1, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: MicroInputs) -> Tensor:
        h = response_hidden(self.decoder, x)
        out: Tensor = self.head(h).squeeze(-1).float()
        return out


class Critic:
    def __init__(self, model: ValueModel, config: TrainerConfig, algo: AlgoConfig, parallel: DataParallel) -> None:
        self.model, self.algo, self.parallel = model, algo, parallel
        lr = config.critic_lr or config.lr
        own = replace(config, lr=lr, min_lr=min(config.min_lr, lr))
        self.optimizer = build_optimizer(model.parameters(), own)
        self.scheduler = build_scheduler(self.optimizer, own)
        self.grad_clip = config.grad_clip if config.grad_clip > 0 else float("inf")
        self.device = next(model.parameters()).device

    @property
    def steps(self) -> int:
        """Batches the critic has been updated on (restored with its schedule from a checkpoint)."""
        return int(self.scheduler.last_epoch)

    @torch.no_grad()
    def values(self, batch: RolloutBatch, plan: Plan, inputs: Inputs, precision: Any) -> Tensor:
        out = torch.zeros(batch.mask_BT.shape, dtype=torch.float32)
        for rows in plan(batch.lengths):
            mb = batch.rows(rows)
            with precision():
                v = self.model(inputs(mb))
            out[rows, : mb.mask_BT.shape[1]] = v.cpu() * mb.mask_BT
        return out

    def update(self, batch: RolloutBatch, returns_BT: Tensor, old_BT: Tensor, plan: Plan, inputs: Inputs,
               precision: Any) -> dict[str, float]:  # fmt: skip
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = self.parallel.sum(torch.tensor(float(batch.mask_BT.sum()))).item()
        total, clipped = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for rows in plan(batch.lengths):
            mb = batch.rows(rows)
            t = mb.mask_BT.shape[1]
            mask = mb.mask_BT.to(self.device)
            with precision():
                v = self.model(inputs(mb))
            old, ret = old_BT[rows, :t].to(self.device), returns_BT[rows, :t].to(self.device)
            loss_BT, metrics = losses.value_loss(v, old, ret, mask, value_clip=self.algo.value_clip)
            loss = red.token_mean(loss_BT * mask, mask, num_tokens=num_tokens)
            loss.backward()  # type: ignore[no-untyped-call]
            total = total + loss.detach()
            clipped = clipped + metrics.get("vf_clipfrac", torch.zeros(())).to(self.device) * float(mask.sum())
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.parallel.sum_grads(params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return {
            "value_loss": self.parallel.sum(total.cpu()).item(),
            "vf_clipfrac": self.parallel.sum(clipped.cpu()).item() / max(num_tokens, 1),
            "critic_grad_norm": grad_norm,
            "values_mean": float((old_BT * batch.mask_BT).sum() / batch.mask_BT.sum().clamp(min=1)),
        }
