"""Per-token policy, KL, entropy and value losses: pure functions of tensors (rl_math.md).

Legend: B samples, T tokens. All `*_BT` tensors are [B, T]; `mask_BT` is 1 where a token counts.
    logp_BT       log π_θ of each token (carries the gradient)
    logp_old_BT   log π_old, recomputed at the start of the step (no gradient)
    logp_ref_BT   log π_ref of a frozen reference model (no gradient)
    adv_BT        advantages

Each function returns per-token losses (to be weighted and reduced by the caller) and, where there is
something to report, a dict of detached scalar diagnostics computed over the masked tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miles_stream.trainer.reductions import masked_mean

LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0


def token_log_ratio(logp_BT: Tensor, logp_old_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """log r_t = logp − logp_old, clamped to ±20 (PPO's per-token ratio)."""
    return (logp_BT - logp_old_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_log_ratio(logp_BT: Tensor, logp_old_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """GSPO: log s_i = mean over masked tokens of (logp − logp_old), broadcast to every token of i."""
    diff = (logp_BT - logp_old_BT) * mask_BT
    per_sample = diff.sum(dim=-1) / mask_BT.sum(dim=-1).clamp(min=1)
    return per_sample.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[:, None].expand_as(logp_BT)


def ppo_clip_loss(
    log_ratio_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_t = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A); with dual clip (c > 1) and A < 0, L_t ≤ −c·A."""
    ratio = log_ratio_BT.exp()
    unclipped = -adv_BT * ratio
    clipped = -adv_BT * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_frac = masked_mean((clipped > unclipped).to(loss.dtype), mask_BT)
    metrics = {"pg_clipfrac": clip_frac.detach()}
    if dual_clip_c is not None:
        bound = -dual_clip_c * adv_BT
        dual = torch.where(adv_BT < 0, torch.minimum(loss, bound), loss)
        metrics["pg_dual_clipfrac"] = masked_mean(((adv_BT < 0) & (loss > bound)).to(loss.dtype), mask_BT).detach()
        loss = dual
    with torch.no_grad():
        # approx KL(π_old ‖ π_θ) with Schulman's k3 estimator: (r − 1) − log r
        metrics["ppo_kl"] = masked_mean(ratio - 1 - log_ratio_BT, mask_BT)
    return loss, metrics


def cispo_loss(
    log_ratio_BT: Tensor, logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, *, eps_clip: float, eps_clip_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, as slime): L_t = −sg(clip(r, 1−ε_low, 1+ε_high))·A·logp. The gradient flows through
    logp only, so a clipped token still learns, with its weight capped."""
    ratio = log_ratio_BT.exp()
    capped = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high).detach()
    metrics = {"pg_clipfrac": masked_mean((capped != ratio).to(ratio.dtype), mask_BT).detach()}
    with torch.no_grad():
        metrics["ppo_kl"] = masked_mean(ratio - 1 - log_ratio_BT, mask_BT)
    return -capped * adv_BT * logp_BT, metrics


def sft_nll(logp_BT: Tensor) -> Tensor:
    """Supervised fine-tuning: −log π_θ of each target token (miles' sft loss, masked and reduced as the
    policy loss is)."""
    return -logp_BT


def kl_k1(log_ratio_BT: Tensor) -> Tensor:
    return log_ratio_BT


def kl_k2(log_ratio_BT: Tensor) -> Tensor:
    return 0.5 * log_ratio_BT**2


def kl_k3(log_ratio_BT: Tensor) -> Tensor:
    x = log_ratio_BT.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(-x) + x


def kl_low_var(log_ratio_BT: Tensor) -> Tensor:
    return kl_k3(log_ratio_BT).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def value_loss(
    values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor, *, value_clip: float | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """½·max((V − R)², (V_clipped − R)²) with V_clipped = V_old + clip(V − V_old, ±value_clip). `vf_clipfrac`:
    the share of tokens whose |V − V_old| exceeds value_clip (as miles), whichever branch the max took."""
    unclipped = (values_BT - returns_BT) ** 2
    if value_clip is None:
        return 0.5 * unclipped, {}
    v_clipped = old_values_BT + (values_BT - old_values_BT).clamp(-value_clip, value_clip)
    clipped = (v_clipped - returns_BT) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    outside = ((values_BT - old_values_BT).abs() > value_clip).to(loss.dtype)
    return loss, {"vf_clipfrac": masked_mean(outside, mask_BT).detach()}
