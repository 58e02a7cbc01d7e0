"""Advantage estimators: pure functions of tensors. Definitions in shared/reference/rl_math.md.

Legend: B samples, T response tokens (right-padded), G prompt groups.
    rewards_B   [B]     scalar reward of each sample
    group_B     [B]     int64 group index in [0, G) of each sample (samples of one prompt share it)
    mask_BT     [B, T]  1 for tokens that count (response), 0 for prompt, padding and tool output
    kl_BT       [B, T]  per-token KL estimate of the policy against the reference (REINFORCE++)
    values_BT   [B, T]  critic values (PPO)

Masked-out positions are skipped by every recursion over time: a tool output between two turns neither
receives reward nor breaks the discounting between the tokens around it. Outputs are 0 where mask is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRPO_EPS = 1e-6


def group_stats(rewards_B: Tensor, group_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (group mean, group unbiased std, group size), each [B]. Std is 0 for groups of one."""
    num_groups = int(group_B.max().item()) + 1 if group_B.numel() else 0
    r = rewards_B.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group_B, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, group_B, r)
    mean = total / count.clamp(min=1)
    sq = torch.zeros_like(count).index_add_(0, group_B, (r - mean[group_B]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    dtype = rewards_B.dtype
    return mean[group_B].to(dtype), std[group_B].to(dtype), count[group_B].to(dtype)


def grpo_advantages(
    rewards_B: Tensor, group_B: Tensor, mask_BT: Tensor, *, std_normalization: bool = True, eps: float = GRPO_EPS
) -> Tensor:
    """A_i = (R_i − mean_g R) / (std_g R + eps), broadcast over sample i's tokens.

    `std_normalization=False` (Dr.GRPO) and groups of one sample drop the division. A group of one gets
    advantage 0: it has no baseline but itself.
    """
    mean, std, count = group_stats(rewards_B, group_B)
    centred = rewards_B - mean
    if std_normalization:
        centred = torch.where(count > 1, centred / (std + eps), centred)
    return centred[:, None] * mask_BT


def terminal_rewards(rewards_B: Tensor, mask_BT: Tensor) -> Tensor:
    """[B, T] with R_i at the last masked-in token of sample i and 0 elsewhere (all 0 if none is)."""
    T = mask_BT.shape[-1]
    positions = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    last = torch.where(mask_BT > 0, positions, torch.full_like(positions, -1)).max(dim=-1).values
    out = torch.zeros(mask_BT.shape, dtype=rewards_B.dtype, device=rewards_B.device)
    has = last >= 0
    out[has, last[has]] = rewards_B[has]
    return out


def discounted_returns(token_rewards_BT: Tensor, mask_BT: Tensor, *, gamma: float) -> Tensor:
    """G_t = r_t + γ·G_next, where next is the following masked-in token; 0 where mask is 0."""
    out = torch.zeros_like(token_rewards_BT)
    running = torch.zeros_like(token_rewards_BT[:, 0])
    for t in range(token_rewards_BT.shape[-1] - 1, -1, -1):
        m = mask_BT[:, t] > 0
        running = torch.where(m, token_rewards_BT[:, t] + gamma * running, running)
        out[:, t] = torch.where(m, running, torch.zeros_like(running))
    return out


def reinforce_pp_advantages(
    rewards_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, *, kl_coef: float, gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: per-token reward −kl_coef·KL_t plus R_i at the last token, discounted returns. The
    advantages are the returns (whitened over the batch only with algo.normalize_advantages, as in miles).
    Returns (advantages_BT, returns_BT)."""
    token_rewards = -kl_coef * kl_BT * mask_BT + terminal_rewards(rewards_B, mask_BT)
    returns = discounted_returns(token_rewards, mask_BT, gamma=gamma)
    return returns, returns


def reinforce_pp_baseline_advantages(
    rewards_B: Tensor, group_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, *, kl_coef: float, gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: R_i − mean_g R, then as REINFORCE++. Returns (advantages_BT, returns_BT)."""
    mean, _, _ = group_stats(rewards_B, group_B)
    return reinforce_pp_advantages(rewards_B - mean, kl_BT, mask_BT, kl_coef=kl_coef, gamma=gamma)


def gae_advantages(
    token_rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE: δ_t = r_t + γ·V_next − V_t, A_t = δ_t + γλ·A_next over masked-in tokens (V after the last is 0).

    Returns (advantages_BT, returns_BT = A + V), both 0 where mask is 0. Not whitened.
    """
    adv = torch.zeros_like(values_BT)
    next_value = torch.zeros_like(values_BT[:, 0])
    next_adv = torch.zeros_like(values_BT[:, 0])
    for t in range(values_BT.shape[-1] - 1, -1, -1):
        m = mask_BT[:, t] > 0
        delta = token_rewards_BT[:, t] + gamma * next_value - values_BT[:, t]
        a = delta + gamma * lam * next_adv
        next_adv = torch.where(m, a, next_adv)
        next_value = torch.where(m, values_BT[:, t], next_value)
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
    return adv, (adv + values_BT) * mask_BT
