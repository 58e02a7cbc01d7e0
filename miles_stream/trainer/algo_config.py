"""`AlgoConfig`: the RL algorithm's hyperparameters (no torch here, so configs load fast).

Keys follow the flags miles and slime users know (`advantage_estimator`, `eps_clip`, `eps_clip_high`,
`eps_clip_c`, `kl_loss_coef`, `kl_loss_type`, `entropy_coef`, `tis_clip`, ...); `trainer.algo` turns the
names into functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles_stream.config import check

PolicyLoss = Literal["ppo", "cispo"]
Estimator = Literal["grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"]
KLType = Literal["k1", "k2", "k3", "low_var_kl"]
Reduction = Literal["token_mean", "seq_mean_token_mean"]
TISMode = Literal["off", "truncate", "clip", "mask"]
TISLevel = Literal["token", "sequence", "geometric"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AlgoConfig:
    """RL algorithm hyperparameters. ICEPOP is tis_mode=mask, tis_level=token, tis_clip_low=0.5, tis_clip=5."""

    advantage_estimator: Estimator = "grpo"
    policy_loss: PolicyLoss = "ppo"  # ppo: the clipped surrogate; cispo: clipped IS weight x logp (slime's CISPO)
    grpo_std_normalization: bool = True  # False = Dr.GRPO
    normalize_advantages: bool = False  # whiten any estimator's advantages over this rank's batch (as miles)
    gamma: float = 1.0
    lambd: float = 1.0
    eps_clip: float = 0.2
    eps_clip_high: float | None = None  # None = eps_clip
    eps_clip_c: float | None = None  # dual clip bound c > 1 for negative advantages; None = off
    kl_coef: float = 0.0  # KL in the reward (REINFORCE++, PPO)
    kl_loss_coef: float = 0.0  # KL penalty in the loss
    kl_loss_type: KLType = "low_var_kl"
    entropy_coef: float = 0.0
    value_clip: float | None = 0.2
    num_critic_only_steps: int = 0  # PPO: batches on which only the critic learns, at the start
    loss_reduction: Reduction = "token_mean"
    tis_mode: TISMode = "off"
    tis_level: TISLevel = "token"
    tis_clip_low: float = 0.0
    tis_clip: float = 2.0
    tis_veto_threshold: float = 0.0  # e.g. 1e-4; 0 = off
    tis_batch_normalize: bool = False  # divide the weights by their micro-batch mean (tokens, or samples)
    use_rs: bool = False  # rejection sampling: a ratio outside [rs_clip_low, rs_clip] at rs_level leaves the mask
    rs_level: TISLevel = "token"
    rs_clip_low: float | None = None  # None = tis_clip_low, or 1 / rs_clip where that is 0 (as miles)
    rs_clip: float | None = None  # None = tis_clip
    use_opd: bool = False  # on-policy distillation: A_t -= opd_kl_coef * (log π_student - log π_teacher) (miles)
    opd_kl_coef: float = 1.0
    use_unbiased_kl: bool = False  # the KL loss weighted by π_θ/π_old per token (DeepSeek-V3.2; miles' flag)
    use_opsm: bool = False
    opsm_delta: float = 1e-4

    def __post_init__(self) -> None:
        check(self.eps_clip > 0, "algo.eps_clip", "must be positive")
        check(self.eps_clip_high is None or self.eps_clip_high > 0, "algo.eps_clip_high", "must be positive")
        check(self.eps_clip_c is None or self.eps_clip_c > 1, "algo.eps_clip_c", "dual clip needs c > 1")
        check(0 <= self.gamma <= 1, "algo.gamma", "must be in [0, 1]")
        check(0 <= self.lambd <= 1, "algo.lambd", "must be in [0, 1]")
        for name in ("kl_coef", "kl_loss_coef", "entropy_coef", "tis_veto_threshold", "opd_kl_coef"):
            check(getattr(self, name) >= 0, f"algo.{name}", "must be >= 0")
        check(self.value_clip is None or self.value_clip > 0, "algo.value_clip", "must be positive or null")
        check(self.num_critic_only_steps >= 0, "algo.num_critic_only_steps", "must be >= 0")
        check(0 <= self.tis_clip_low <= self.tis_clip, "algo.tis_clip_low", "must be in [0, tis_clip]")
        check(self.tis_clip > 0, "algo.tis_clip", "must be positive")
        check(self.opsm_delta >= 0, "algo.opsm_delta", "must be >= 0")
        check(not self.use_rs or self.tis_mode != "off", "algo.use_rs", "rejection sampling needs tis_mode on")
        check(
            self.eps_clip_c is None or self.policy_loss == "ppo", "algo.eps_clip_c", "dual clip is PPO's, not CISPO's"
        )
        check(self.rs_bounds[0] <= self.rs_bounds[1], "algo.rs_clip_low", "must be <= rs_clip")
        check(
            not (self.tis_mode == "truncate" and self.tis_clip_low > 0),
            "algo.tis_clip_low",
            "truncate mode clamps to [0, tis_clip]; use tis_mode=clip for a lower bound",
        )

    @property
    def rs_bounds(self) -> tuple[float, float]:
        """Rejection sampling's [low, high]: its own, else the TIS bounds; with no lower bound of either (truncate
        mode has none) 1 / high, as miles (a lower bound of 0 would reject nothing below)."""
        high = self.tis_clip if self.rs_clip is None else self.rs_clip
        if self.rs_clip_low is not None:
            return self.rs_clip_low, high
        return (self.tis_clip_low if self.tis_clip_low > 0 else 1 / high), high

    @property
    def clip_high(self) -> float:
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high
