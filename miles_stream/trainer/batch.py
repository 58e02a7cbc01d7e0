"""A rollout batch as tensors (what every trainer backend takes; the torch backend's forward inputs are in
torch/inputs.py).

Legend: B samples in the batch, T response tokens (padded to the longest). Row b is one sample; samples of
one group are adjacent.

    RolloutBatch.logp_rollout_BT  float32 [B, T]   behaviour logprobs, 0 past each response
    RolloutBatch.mask_BT          float32 [B, T]   loss mask (tool output and padding are 0)
    RolloutBatch.rewards_B        float32 [B]
    RolloutBatch.group_B          int64   [B]      index of the sample's group in the batch
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from miles_stream.schema import TrajectoryGroup


@dataclass(frozen=True, slots=True)
class RolloutBatch:
    prompts: list[np.ndarray]
    responses: list[np.ndarray]
    logp_rollout_BT: Tensor
    mask_BT: Tensor
    rewards_B: Tensor
    group_B: Tensor
    routing: list[np.ndarray | None] = field(default_factory=list)  # per sample, MoE traces (R3); may be empty

    @property
    def size(self) -> int:
        return len(self.responses)

    @property
    def lengths(self) -> list[int]:
        """Prompt + response tokens of each row: what a forward pass over it costs."""
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses, strict=True)]

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.responses]

    def rows(self, idx: Sequence[int]) -> RolloutBatch:
        """The batch restricted to rows `idx`, response columns cut to the longest of them."""
        t = max((len(self.responses[i]) for i in idx), default=0)
        index = torch.as_tensor(list(idx), dtype=torch.long)
        return RolloutBatch(
            prompts=[self.prompts[i] for i in idx],
            responses=[self.responses[i] for i in idx],
            logp_rollout_BT=self.logp_rollout_BT[index, :t],
            mask_BT=self.mask_BT[index, :t],
            rewards_B=self.rewards_B[index],
            group_B=self.group_B[index],
            routing=[self.routing[i] for i in idx] if self.routing else [],
        )


def collate(groups: Sequence[TrajectoryGroup]) -> RolloutBatch:
    """Every sample of every group, one row each."""
    prompts, responses, logps, masks, rewards, group_ids = [], [], [], [], [], []
    routing: list[np.ndarray | None] = []
    for g, group in enumerate(groups):
        for s in group.samples:
            prompts.append(group.prompt_ids)
            responses.append(s.response_ids)
            logps.append(s.logprobs)
            masks.append(s.loss_mask)
            rewards.append(s.reward)
            group_ids.append(g)
            routing.append(s.routing)
    t = max((len(r) for r in responses), default=0)
    return RolloutBatch(
        prompts=prompts,
        responses=responses,
        logp_rollout_BT=_pad([np.asarray(x, np.float32) for x in logps], t, torch.float32),
        mask_BT=_pad([np.asarray(x, np.float32) for x in masks], t, torch.float32),
        rewards_B=torch.tensor(rewards, dtype=torch.float32),
        group_B=torch.tensor(group_ids, dtype=torch.long),
        routing=routing if any(r is not None for r in routing) else [],
    )


def supervised(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray]) -> RolloutBatch:
    """A batch of given answers (SFT): every response token is a target, one group per sample, no rewards."""
    t = max((len(r) for r in responses), default=0)
    return RolloutBatch(
        prompts=list(prompts),
        responses=list(responses),
        logp_rollout_BT=torch.zeros(len(responses), t),
        mask_BT=_pad([np.ones(len(r), np.float32) for r in responses], t, torch.float32),
        rewards_B=torch.zeros(len(responses)),
        group_B=torch.arange(len(responses)),
    )


def _pad(rows: list[np.ndarray], width: int, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)  # a copy: decoded arrays are read-only views
    return out
