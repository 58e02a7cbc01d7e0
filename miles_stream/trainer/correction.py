"""Off-policy correction against the behaviour (rollout) logprobs: TIS, MIS, ICEPOP, veto, OPSM.

Legend: B samples, T tokens; `mask_BT` is 1 where a token counts.
    logp_old_BT      log π_old recomputed by the trainer (no gradient)
    logp_rollout_BT  log μ reported by the rollout engine when it sampled the token

The importance weight of a token is w = exp(logp_old − logp_rollout), at one of three levels:
    token      w_t
    sequence   w_i = exp Σ_t (logp_old − logp_rollout), applied to every token of sample i
    geometric  w_i = exp mean_t (logp_old − logp_rollout)
and one of three modes:
    truncate   w ← min(w, high)                 (TIS; low is 0)
    clip       w ← clamp(w, low, high)
    mask       tokens (or samples) with w outside [low, high] leave the loss mask; the rest keep w (MIS;
               at token level this is ICEPOP)
Weights never carry gradient. With logp_old == logp_rollout every mode is the identity. Rejection sampling
(`use_rs`) masks by a ratio of its own level and bounds; `tis_batch_normalize` rescales the weights to mean 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from miles_stream.trainer.reductions import masked_mean

LOG_W_CLAMP = 20.0
LevelFn = Callable[[Tensor, Tensor], Tensor]
ModeFn = Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]]


def token_level(log_w_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return log_w_BT * mask_BT


def sequence_level(log_w_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return (log_w_BT * mask_BT).sum(dim=-1, keepdim=True).expand_as(log_w_BT)


def geometric_level(log_w_BT: Tensor, mask_BT: Tensor) -> Tensor:
    per_sample = (log_w_BT * mask_BT).sum(dim=-1) / mask_BT.sum(dim=-1).clamp(min=1)
    return per_sample[:, None].expand_as(log_w_BT)


def truncate_mode(w_BT: Tensor, mask_BT: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    return w_BT.clamp(max=high), mask_BT


def clip_mode(w_BT: Tensor, mask_BT: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    return w_BT.clamp(low, high), mask_BT


def mask_mode(w_BT: Tensor, mask_BT: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    inside = (w_BT >= low) & (w_BT <= high)
    return torch.where(inside, w_BT, torch.zeros_like(w_BT)), mask_BT * inside.to(mask_BT.dtype)


def importance_weights(
    logp_old_BT: Tensor,
    logp_rollout_BT: Tensor,
    mask_BT: Tensor,
    *,
    level: LevelFn,
    mode: ModeFn,
    low: float,
    high: float,
    veto_threshold: float = 0.0,
    rs_level: LevelFn | None = None,
    rs_low: float = 0.0,
    rs_high: float = float("inf"),
    batch_normalize: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Returns (w_BT, corrected mask_BT, diagnostics). Multiply per-token losses by w and reduce them
    with the corrected mask. `veto_threshold` > 0 masks every sample holding a token with w_t below it.
    `rs_level` (rejection sampling, decoupled from the weights as in slime's MIS): tokens or samples whose
    ratio at that level lies outside [rs_low, rs_high] also leave the mask. `batch_normalize`: the weights
    are divided by their mean over the tokens (token level) or over the samples (sequence, geometric) of
    this micro-batch, so they average 1."""
    with torch.no_grad():
        dtype = torch.promote_types(logp_old_BT.dtype, torch.float32)  # bf16 in, at least fp32 inside
        log_w_tok = (logp_old_BT.to(dtype) - logp_rollout_BT.to(dtype)) * mask_BT
        log_w = level(log_w_tok, mask_BT).clamp(-LOG_W_CLAMP, LOG_W_CLAMP)
        raw = log_w.exp() * mask_BT
        w, mode_mask = mode(raw, mask_BT, low, high)
        clipped, new_mask = (w != raw).float(), mode_mask
        metrics: dict[str, Tensor] = {}
        if rs_level is not None:
            rs_w = rs_level(log_w_tok, mask_BT).clamp(-LOG_W_CLAMP, LOG_W_CLAMP).exp()
            inside = ((rs_w >= rs_low) & (rs_w <= rs_high)).to(new_mask.dtype)
            metrics["rs_masked_frac"] = masked_mean(1 - inside, mask_BT)
            new_mask = new_mask * inside
        if batch_normalize:  # over every token of the mask, a mask-mode rejected one at its raw weight (slime)
            basis = torch.where(mode_mask > 0, w, raw) * mask_BT
            if level is token_level:
                mean = basis.sum() / mask_BT.sum().clamp(min=1)
            else:  # one weight a sample: the mean over samples that have a token (no host sync)
                has = (mask_BT.sum(dim=-1) > 0).to(basis.dtype)
                per_sample = basis.sum(dim=-1) / mask_BT.sum(dim=-1).clamp(min=1)
                mean = (per_sample * has).sum() / has.sum().clamp(min=1)
            factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
            w = w / factor
            metrics["tis_batch_norm_factor"] = factor
        if veto_threshold > 0:
            vetoed = ((log_w_tok.exp() < veto_threshold) & (mask_BT > 0)).any(dim=-1, keepdim=True)
            new_mask = new_mask * (~vetoed).to(new_mask.dtype)
        else:
            vetoed = torch.zeros_like(mask_BT[:, :1], dtype=torch.bool)
        w = w * new_mask
        n = mask_BT.sum().clamp(min=1)
        metrics |= {
            "tis_mean": masked_mean(raw, mask_BT),
            "tis_clipfrac": masked_mean(clipped * new_mask, mask_BT),
            "tis_masked_frac": 1 - new_mask.sum() / n,
            "tis_veto_frac": vetoed.float().mean(),
            "tis_ess": effective_sample_size(w, new_mask),
        }
    return w.to(logp_old_BT.dtype), new_mask, metrics


def effective_sample_size(w_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """(Σw)² / (n·Σw²) over the masked tokens: 1 when all weights are equal, → 1/n when one dominates."""
    w = w_BT * mask_BT
    n = mask_BT.sum()
    denom = n * (w**2).sum()
    return torch.where(denom > 0, w.sum() ** 2 / denom.clamp(min=1e-30), torch.ones_like(denom))


def sample_ess(log_ratio_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-sample effective sample size of the weights π_θ/π_old, ESS_i = (Σ_t w)² / (n_i Σ_t w²), averaged
    over the micro-batch's tokens (each sample weighted by its token count, as miles with per-token loss)."""
    with torch.no_grad():
        w = log_ratio_BT.float().clamp(-LOG_W_CLAMP, LOG_W_CLAMP).exp() * mask_BT
        n = mask_BT.sum(dim=-1)
        ess = w.sum(dim=-1) ** 2 / (n.clamp(min=1) * (w**2).sum(dim=-1).clamp(min=1e-8))
        return (ess * n).sum() / n.sum().clamp(min=1)


def opsm_keep(logp_BT: Tensor, logp_rollout_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, *, delta: float) -> Tensor:
    """Off-policy sequence masking: [B, T] keep-mask that drops token t of sample i when its advantage A_t is
    negative and the sample drifted, mean_t (logp_rollout − logp) > delta (the policy has moved too far from
    the data; as miles, per token, so a sample whose advantages change sign keeps its positive tokens)."""
    with torch.no_grad():
        n = mask_BT.sum(dim=-1, keepdim=True).clamp(min=1)
        drift = ((logp_rollout_BT - logp_BT) * mask_BT).sum(dim=-1, keepdim=True) / n
        drop = (adv_BT < 0) & (drift > delta)
    return (~drop).to(mask_BT.dtype)


def mismatch_metrics(logp_old_BT: Tensor, logp_rollout_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    """Train–inference mismatch: mean |logp_old − logp_rollout| and KL(μ ‖ π_old) (k1 and k3 estimators,
    valid because the tokens were sampled from μ)."""
    with torch.no_grad():
        dtype = torch.promote_types(logp_old_BT.dtype, torch.float32)
        d = logp_rollout_BT.to(dtype) - logp_old_BT.to(dtype)
        return {
            "mismatch_abs": masked_mean(d.abs(), mask_BT),
            "mismatch_kl_k1": masked_mean(d, mask_BT),
            "mismatch_kl_k3": masked_mean(torch.expm1(-d.clamp(-LOG_W_CLAMP, LOG_W_CLAMP)) + d, mask_BT),
        }
