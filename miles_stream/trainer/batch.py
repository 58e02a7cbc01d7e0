"""A rollout batch as tensors, and the inputs of one micro-batch's forward pass.

Legend: B samples in the batch, T response tokens (padded to the longest), b samples in a micro-batch,
L prompt + response tokens (padded). Row b is one sample; samples of one group are adjacent.

    RolloutBatch.logp_rollout_BT  float32 [B, T]   behaviour logprobs, 0 past each response
    RolloutBatch.mask_BT          float32 [B, T]   loss mask (tool output and padding are 0)
    RolloutBatch.rewards_B        float32 [B]
    RolloutBatch.group_B          int64   [B]      index of the sample's group in the batch
    MicroInputs.input_ids         int64   [b, L]   prompt then response, right-padded
    MicroInputs.positions_bT      int64   [b, T]   position whose logits predict each response token
    MicroInputs.targets_bT        int64   [b, T]   the response tokens (0 past the end)
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


@dataclass(frozen=True, slots=True)
class MicroInputs:
    """The forward pass's inputs: [rows, L] ids (with a padding mask, or packed with position ids restarting
    at each sequence), and for each of the b samples where its T response tokens are read (row, position)."""

    input_ids: Tensor
    attention_mask: Tensor | None
    positions_bT: Tensor
    targets_bT: Tensor
    row_b: Tensor | None = None  # the row holding each sample; None: sample i is row i
    position_ids: Tensor | None = None  # packed rows only
    cu_seqlens: Tensor | None = None  # packed rows: int32 [n + 1], where each sequence starts (and the end)
    max_length: int = 0  # packed rows: the longest sequence


def micro_inputs(batch: RolloutBatch, device: torch.device | str) -> MicroInputs:
    """The forward-pass inputs of `batch` (already cut to one micro-batch's rows)."""
    b, t = batch.size, batch.mask_BT.shape[1]
    length = max(batch.lengths)
    input_ids = np.zeros((b, length), dtype=np.int64)  # filled in numpy: a torch op per row costs more than
    attention = np.zeros((b, length), dtype=np.int64)  # the row itself at one-token answers
    positions = np.zeros((b, t), dtype=np.int64)
    targets = np.zeros((b, t), dtype=np.int64)
    for i, (prompt, response) in enumerate(zip(batch.prompts, batch.responses, strict=True)):
        p, n = len(prompt), len(response)
        input_ids[i, :p] = prompt
        input_ids[i, p : p + n] = response
        attention[i, : p + n] = 1
        positions[i, :n] = np.arange(p - 1, p - 1 + n)
        targets[i, :n] = response
    ids_t, attention_t, positions_t, targets_t = (torch.from_numpy(x).to(device)
                                                  for x in (input_ids, attention, positions, targets))  # fmt: skip
    return MicroInputs(ids_t, attention_t, positions_t, targets_t)


def packed_inputs(batch: RolloutBatch, device: torch.device | str) -> MicroInputs:
    """All of `batch` in one row, sequence after sequence, each with positions from 0: no padding. The model
    keeps the sequences apart by their boundaries (`kernels.packed_attention`)."""
    b, t = batch.size, batch.mask_BT.shape[1]
    ids: list[int] = []
    positions = torch.zeros(b, t, dtype=torch.long)
    targets = torch.zeros(b, t, dtype=torch.long)
    position_ids: list[int] = []
    for i, (prompt, response) in enumerate(zip(batch.prompts, batch.responses, strict=True)):
        start, p, n = len(ids), len(prompt), len(response)
        ids += [*prompt.tolist(), *response.tolist()]
        position_ids += range(p + n)
        positions[i, :n] = torch.arange(start + p - 1, start + p - 1 + n)
        targets[i, :n] = torch.as_tensor(response.astype(np.int64))
    row = torch.zeros(b, dtype=torch.long)
    cu = torch.tensor([0, *np.cumsum(batch.lengths)], dtype=torch.int32)
    tensors = (torch.tensor([ids]), positions, targets, row, torch.tensor([position_ids]), cu)
    input_ids, positions_bT, targets_bT, row_b, pos, cu = (x.to(device) for x in tensors)
    return MicroInputs(input_ids, None, positions_bT, targets_bT, row_b=row_b, position_ids=pos, cu_seqlens=cu,
                       max_length=max(batch.lengths))  # fmt: skip


def _pad(rows: list[np.ndarray], width: int, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)  # a copy: decoded arrays are read-only views
    return out
