"""The algorithm's config and the registry that turns its names into the pure functions, once, at the edge.

`AlgoConfig` keys follow the flags miles and slime users know (`advantage_estimator`, `eps_clip`,
`eps_clip_high`, `eps_clip_c`, `kl_loss_coef`, `kl_loss_type`, `entropy_coef`, `tis_clip`, ...).
`build_objective(config)` looks every name up in the tables below and returns a `PolicyObjective` whose
call is straight-line tensor code: no string branches inside the loss.

Legend: B samples, T tokens, as in `losses.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from miles_stream.trainer import advantages as adv
from miles_stream.trainer import correction as corr
from miles_stream.trainer import losses
from miles_stream.trainer import reductions as red
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.reductions import whiten

__all__ = ["AdvantageInputs", "AlgoConfig", "LossInputs", "PolicyObjective", "build_objective", "compute_advantages"]


# ---- advantages -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class AdvantageInputs:
    rewards_B: Tensor
    group_B: Tensor
    mask_BT: Tensor
    kl_BT: Tensor | None = None  # log π_old − log π_ref per token; the reward KL is kl_loss_type's estimate of it
    values_BT: Tensor | None = None  # critic values (PPO)
    student_BT: Tensor | None = None  # on-policy distillation: the student's (old) logprobs
    teacher_BT: Tensor | None = None  # and the teacher's


AdvantageFn = Callable[[AdvantageInputs, AlgoConfig], tuple[Tensor, Tensor | None]]


def _grpo(x: AdvantageInputs, c: AlgoConfig) -> tuple[Tensor, Tensor | None]:
    a = adv.grpo_advantages(x.rewards_B, x.group_B, x.mask_BT, std_normalization=c.grpo_std_normalization)
    return a, None


def _kl(x: AdvantageInputs, c: AlgoConfig) -> Tensor:
    """The reward KL per token, by the estimator the KL loss uses (`kl_loss_type`, as miles)."""
    if x.kl_BT is None:
        return x.mask_BT.new_zeros(x.mask_BT.shape, dtype=x.rewards_B.dtype)
    return KL_ESTIMATORS[c.kl_loss_type](x.kl_BT)


def _reinforce_pp(x: AdvantageInputs, c: AlgoConfig) -> tuple[Tensor, Tensor | None]:
    return adv.reinforce_pp_advantages(x.rewards_B, _kl(x, c), x.mask_BT, kl_coef=c.kl_coef, gamma=c.gamma)


def _reinforce_pp_baseline(x: AdvantageInputs, c: AlgoConfig) -> tuple[Tensor, Tensor | None]:
    return adv.reinforce_pp_baseline_advantages(
        x.rewards_B, x.group_B, _kl(x, c), x.mask_BT, kl_coef=c.kl_coef, gamma=c.gamma
    )


def _ppo(x: AdvantageInputs, c: AlgoConfig) -> tuple[Tensor, Tensor | None]:
    if x.values_BT is None:
        raise ValueError("advantage_estimator=ppo needs critic values (values_BT)")
    token_rewards = adv.terminal_rewards(x.rewards_B, x.mask_BT) - c.kl_coef * _kl(x, c) * x.mask_BT
    a, returns = adv.gae_advantages(token_rewards, x.values_BT, x.mask_BT, gamma=c.gamma, lam=c.lambd)
    return a, returns


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "grpo": _grpo,
    "gspo": _grpo,
    "reinforce_plus_plus": _reinforce_pp,
    "reinforce_plus_plus_baseline": _reinforce_pp_baseline,
    "ppo": _ppo,
}
RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "grpo": losses.token_log_ratio,
    "gspo": losses.sequence_log_ratio,
    "reinforce_plus_plus": losses.token_log_ratio,
    "reinforce_plus_plus_baseline": losses.token_log_ratio,
    "ppo": losses.token_log_ratio,
}
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": losses.kl_k1,
    "k2": losses.kl_k2,
    "k3": losses.kl_k3,
    "low_var_kl": losses.kl_low_var,
}
TIS_LEVELS: dict[str, corr.LevelFn] = {
    "token": corr.token_level,
    "sequence": corr.sequence_level,
    "geometric": corr.geometric_level,
}
TIS_MODES: dict[str, corr.ModeFn] = {"truncate": corr.truncate_mode, "clip": corr.clip_mode, "mask": corr.mask_mode}


def compute_advantages(config: AlgoConfig, inputs: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    """(advantages_BT, returns_BT or None) for the whole batch, before it is split into micro-batches. With
    `normalize_advantages` every estimator's advantages are whitened over the batch (miles does the same)."""
    a, returns = ADVANTAGE_ESTIMATORS[config.advantage_estimator](inputs, config)
    if config.use_opd:  # after any estimator, before whitening (as miles): minus the reverse KL to the teacher
        if inputs.student_BT is None or inputs.teacher_BT is None:
            raise ValueError("algo.use_opd needs student and teacher logprobs")
        a = a - config.opd_kl_coef * (inputs.student_BT - inputs.teacher_BT) * inputs.mask_BT
    return (whiten(a, inputs.mask_BT) if config.normalize_advantages else a), returns


# ---- policy objective ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class LossInputs:
    """One micro-batch. `num_tokens` / `num_samples` are the whole batch's (see reductions.py)."""

    logp_BT: Tensor
    logp_old_BT: Tensor
    logp_rollout_BT: Tensor
    adv_BT: Tensor
    mask_BT: Tensor
    num_tokens: float | Tensor
    num_samples: float | Tensor
    logp_ref_BT: Tensor | None = None
    entropy_BT: Tensor | None = None


@dataclass(frozen=True, slots=True)
class PolicyObjective:
    """The policy loss with every choice resolved. Call it on a micro-batch: returns (loss, metrics)."""

    config: AlgoConfig
    ratio: Callable[[Tensor, Tensor, Tensor], Tensor]
    kl: Callable[[Tensor], Tensor]
    level: corr.LevelFn | None
    mode: corr.ModeFn | None
    token_mean: bool

    def reduce(self, x: LossInputs, loss_BT: Tensor) -> Tensor:
        return _reduce(self.token_mean, x, loss_BT)

    def __call__(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        x, nonfinite = finite_inputs(x)
        metrics = corr.mismatch_metrics(x.logp_old_BT, x.logp_rollout_BT, x.mask_BT)
        metrics["nonfinite_frac"] = nonfinite
        weight: Tensor | float = 1.0
        keep = x.mask_BT  # what TIS mask mode and the veto leave: every term of the loss uses it (as miles)
        if self.level is not None and self.mode is not None:
            weight, keep, tis = corr.importance_weights(
                x.logp_old_BT,
                x.logp_rollout_BT,
                x.mask_BT,
                level=self.level,
                mode=self.mode,
                low=c.tis_clip_low,
                high=c.tis_clip,
                veto_threshold=c.tis_veto_threshold,
                rs_level=TIS_LEVELS[c.rs_level] if c.use_rs else None,
                rs_low=c.rs_bounds[0],
                rs_high=c.rs_bounds[1],
                batch_normalize=c.tis_batch_normalize,
            )
            metrics.update(tis)
        pg_mask = keep
        if c.use_opsm:  # OPSM drops the policy-gradient term only (as miles): `keep` stays what KL and entropy use
            opsm = corr.opsm_keep(x.logp_BT, x.logp_rollout_BT, x.adv_BT, x.mask_BT, delta=c.opsm_delta)
            metrics["opsm_masked_frac"] = 1 - red.masked_mean(opsm, x.mask_BT)  # share of active tokens
            pg_mask = pg_mask * opsm
        log_ratio = self.ratio(x.logp_BT, x.logp_old_BT, x.mask_BT)
        metrics["ess_ratio"] = corr.sample_ess(x.logp_BT.detach() - x.logp_old_BT, x.mask_BT)
        if c.policy_loss == "cispo":
            pg_BT, pg_metrics = losses.cispo_loss(log_ratio, x.logp_BT, x.adv_BT, x.mask_BT, eps_clip=c.eps_clip,
                                                  eps_clip_high=c.clip_high)  # fmt: skip
        else:
            pg_BT, pg_metrics = losses.ppo_clip_loss(log_ratio, x.adv_BT, x.mask_BT, eps_clip=c.eps_clip,
                                                     eps_clip_high=c.clip_high, dual_clip_c=c.eps_clip_c)  # fmt: skip
        metrics.update(pg_metrics)
        pg_loss = self.reduce(x, pg_BT * weight * pg_mask)
        loss = pg_loss
        metrics["pg_loss"] = pg_loss.detach()
        if c.kl_loss_coef > 0:
            if x.logp_ref_BT is None:
                raise ValueError("kl_loss_coef > 0 needs reference logprobs (logp_ref_BT)")
            kl_BT = self.kl(x.logp_BT - x.logp_ref_BT)
            if c.use_unbiased_kl:  # the ratio carries gradient, as in miles
                kl_BT = kl_BT * (x.logp_BT - x.logp_old_BT).clamp(-corr.LOG_W_CLAMP, corr.LOG_W_CLAMP).exp()
            kl_loss = self.reduce(x, kl_BT * keep)
            loss = loss + c.kl_loss_coef * kl_loss
            metrics["kl_loss"] = kl_loss.detach()
        if x.entropy_BT is not None:
            entropy = self.reduce(x, x.entropy_BT * keep)
            metrics["entropy"] = entropy.detach()
            if c.entropy_coef > 0:
                loss = loss - c.entropy_coef * entropy
        metrics["loss"] = loss.detach()
        return loss, metrics


@dataclass(frozen=True, slots=True)
class SftObjective:
    """Supervised fine-tuning on given answers: −log π_θ of every target token, reduced as the policy loss is
    (`algo.loss_reduction`). No advantages, corrections or KL. `loss` is the mean NLL per token."""

    token_mean: bool

    def __call__(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        x, nonfinite = finite_inputs(x)
        loss = _reduce(self.token_mean, x, losses.sft_nll(x.logp_BT) * x.mask_BT)
        metrics = {"loss": loss.detach(), "nonfinite_frac": nonfinite}
        if x.entropy_BT is not None:
            metrics["entropy"] = _reduce(self.token_mean, x, x.entropy_BT * x.mask_BT).detach()
        return loss, metrics


Objective = PolicyObjective | SftObjective


_PER_TOKEN = ("logp_BT", "logp_old_BT", "logp_rollout_BT", "adv_BT", "logp_ref_BT", "entropy_BT")


def finite_inputs(x: LossInputs) -> tuple[LossInputs, Tensor]:
    """`x` with every per-token value outside the mask, and every non-finite one, set to 0 before any
    reduction (NaN x 0 is NaN: one stray value in a padded or tool token poisoned the whole step), and the
    share of active tokens that held a non-finite value."""
    active = x.mask_BT > 0
    bad = torch.zeros((), dtype=torch.float32, device=x.mask_BT.device)
    clean: dict[str, Tensor] = {}
    for name in _PER_TOKEN:
        t = getattr(x, name)
        if t is None:
            continue
        finite = torch.isfinite(t)
        bad = bad + (active & ~finite).sum()
        clean[name] = torch.where(active & finite, t, torch.zeros_like(t))
    return replace(x, **clean), bad / active.sum().clamp(min=1)


def _reduce(token_mean: bool, x: LossInputs, loss_BT: Tensor) -> Tensor:
    """Reduce already-masked per-token losses; denominators come from the original mask."""
    if token_mean:
        return red.token_mean(loss_BT, x.mask_BT, num_tokens=x.num_tokens)
    return red.seq_mean_token_mean(loss_BT, x.mask_BT, num_samples=x.num_samples)


def build_objective(config: AlgoConfig) -> PolicyObjective:
    correct = config.tis_mode != "off"
    return PolicyObjective(
        config=config,
        ratio=RATIOS[config.advantage_estimator],
        kl=KL_ESTIMATORS[config.kl_loss_type],
        level=TIS_LEVELS[config.tis_level] if correct else None,
        mode=TIS_MODES[config.tis_mode] if correct else None,
        token_mean=config.loss_reduction == "token_mean",
    )
