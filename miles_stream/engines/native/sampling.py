"""Token sampling with per-row parameters: pure functions of tensors.

Legend: B rows, V vocabulary. `temperature_B` 0 means greedy; `top_k_B` 0 and `top_p_B` 1 mean off.
The logprob returned is log_softmax(logits / T) of the chosen token before truncation (T = 1 for greedy).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_tokens(
    logits_BV: Tensor,
    temperature_B: Tensor,
    top_k_B: Tensor,
    top_p_B: Tensor,
    generator: torch.Generator | None,
    *,
    any_truncation: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (tokens_B int64, logprobs_B float32). `any_truncation`: whether some row has top-k or top-p, if
    the caller knows (else it is read from the tensors, which waits for the device)."""
    greedy = temperature_B <= 0
    t = torch.where(greedy, torch.ones_like(temperature_B), temperature_B)
    scaled = logits_BV.float() / t[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    needs_truncation = bool(((top_k_B > 0) | (top_p_B < 1)).any()) if any_truncation is None else any_truncation
    filtered = truncate(scaled, top_k_B, top_p_B) if needs_truncation else scaled
    probs = torch.softmax(filtered, dim=-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tokens = torch.where(greedy, scaled.argmax(dim=-1), sampled)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def truncate(scaled_BV: Tensor, top_k_B: Tensor, top_p_B: Tensor) -> Tensor:
    """Logits with everything outside each row's top-k and top-p nucleus set to -inf (at least one kept)."""
    sorted_logits, order = scaled_BV.sort(dim=-1, descending=True)
    V = scaled_BV.shape[-1]
    rank = torch.arange(V, device=scaled_BV.device).expand_as(sorted_logits)
    k = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, V))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above
    drop |= before >= top_p_B[:, None]
    drop[:, 0] = False
    return scaled_BV.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
