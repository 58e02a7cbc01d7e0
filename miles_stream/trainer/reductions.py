"""Loss reductions with the denominator passed in, so micro-batching does not change the gradient.

Legend: B samples, T tokens (right-padded). `loss_BT` per-token losses, `mask_BT` 1 where a token counts.

Split a batch into micro-batches and pass each call the denominator of the *whole* batch (total masked
tokens for `token_mean`, number of samples for `seq_mean_token_mean`); the micro-batch losses then add
up to the whole-batch loss exactly, and so do their gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return (x_BT * mask_BT).sum()


def masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean over masked entries; 0 when nothing is masked in."""
    return (x_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def token_mean(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: float | Tensor) -> Tensor:
    """Σ loss·mask / num_tokens, where num_tokens counts the masked tokens of the whole batch (DAPO)."""
    return masked_sum(loss_BT, mask_BT) / _positive(num_tokens)


def seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, *, num_samples: float | Tensor) -> Tensor:
    """Σ_i (Σ_t loss·mask / Σ_t mask) / num_samples; samples with no masked token add 0."""
    per_sample = (loss_BT * mask_BT).sum(dim=-1) / mask_BT.sum(dim=-1).clamp(min=1)
    return per_sample.sum() / _positive(num_samples)


def _positive(denominator: float | Tensor) -> float | Tensor:
    if isinstance(denominator, Tensor):
        return denominator.clamp(min=1)
    return max(float(denominator), 1.0)


def whiten(x_BT: Tensor, mask_BT: Tensor, *, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """(x − mean) / std over the masked entries (unbiased std), plus the mean again unless `shift_mean`
    (as miles' distributed_masked_whiten); masked-out entries become 0."""
    n = mask_BT.sum()
    mean = masked_sum(x_BT, mask_BT) / n.clamp(min=1)
    var = masked_sum((x_BT - mean) ** 2, mask_BT) / (n - 1).clamp(min=1)
    out = (x_BT - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask_BT
