"""The torch backend's forward-pass inputs for one micro-batch of a `RolloutBatch`.

Legend: b samples in a micro-batch, L prompt + response tokens (padded), T response tokens.

    MicroInputs.input_ids         int64   [b, L]   prompt then response, right-padded
    MicroInputs.positions_bT      int64   [b, T]   position whose logits predict each response token
    MicroInputs.targets_bT        int64   [b, T]   the response tokens (0 past the end)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from miles_stream.trainer.batch import RolloutBatch


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
