"""Advantage estimators against hand-computed values and slow, obviously-correct loops."""

from __future__ import annotations

import math

import pytest
import torch

from miles_stream.trainer import advantages as adv
from miles_stream.trainer.algo import AdvantageInputs, AlgoConfig, compute_advantages
from miles_stream.trainer.reductions import whiten


def ragged_mask(lengths: list[int], T: int, holes: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        if holes and n > 3:  # a "tool output" hole inside the response
            start = int(torch.randint(1, n - 2, (1,), generator=g))
            mask[i, start : start + 2] = 0
    return mask


def test_grpo_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    mask = torch.ones(6, 3, dtype=torch.float64)
    a = adv.grpo_advantages(rewards, group, mask)
    # group 0: mean 0.25, unbiased std sqrt(((0.75)^2 + 3*(0.25)^2)/3) = 0.5
    assert a[0, 0].item() == pytest.approx(0.75 / (0.5 + 1e-6))
    assert a[1, 2].item() == pytest.approx(-0.25 / (0.5 + 1e-6))
    # group 1: mean 3, std sqrt(2)
    assert a[5, 1].item() == pytest.approx(1 / (math.sqrt(2) + 1e-6))


def test_dr_grpo_drops_the_std_division() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a = adv.grpo_advantages(rewards, torch.zeros(4, dtype=torch.long), torch.ones(4, 2), std_normalization=False)
    assert torch.allclose(a[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_grpo_with_one_sample_per_group_is_zero_not_nan() -> None:
    a = adv.grpo_advantages(torch.tensor([3.0, -1.0]), torch.tensor([0, 1]), torch.ones(2, 4))
    assert torch.equal(a, torch.zeros(2, 4))


def test_grpo_equal_rewards_give_zero_advantage() -> None:
    a = adv.grpo_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), torch.ones(4, 3))
    assert torch.equal(a, torch.zeros(4, 3))


def test_grpo_matches_loop_reference_with_ragged_groups() -> None:
    g = torch.Generator().manual_seed(0)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    rewards = torch.randn(10, generator=g, dtype=torch.float64)
    mask = ragged_mask([5, 3, 7, 1, 0, 4, 6, 2, 7, 7], 7).double()
    got = adv.grpo_advantages(rewards, group, mask)
    for i in range(10):
        members = [float(rewards[j]) for j in range(10) if group[j] == group[i]]
        mean = sum(members) / len(members)
        if len(members) > 1:
            std = math.sqrt(sum((r - mean) ** 2 for r in members) / (len(members) - 1))
            expected = (float(rewards[i]) - mean) / (std + 1e-6)
        else:
            expected = float(rewards[i]) - mean
        for t in range(7):
            assert got[i, t].item() == pytest.approx(expected * float(mask[i, t]), abs=1e-12)


def loop_returns(token_rewards: list[list[float]], mask: list[list[float]], gamma: float) -> list[list[float]]:
    out = []
    for r, m in zip(token_rewards, mask, strict=True):
        row = [0.0] * len(r)
        g = 0.0
        for t in reversed(range(len(r))):
            if m[t]:
                g = r[t] + gamma * g
                row[t] = g
        out.append(row)
    return out


def test_terminal_reward_lands_on_last_unmasked_token() -> None:
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    out = adv.terminal_rewards(torch.tensor([5.0, 7.0, 9.0]), mask)
    assert torch.equal(out, torch.tensor([[0.0, 5, 0, 0], [0, 0, 7, 0], [0, 0, 0, 0]]))


def test_reinforce_pp_hand_computed() -> None:
    # one sample, 3 tokens, KL 0.1 per token, β = 0.5, γ = 0.5, reward 1:
    # token rewards [-0.05, -0.05, 0.95]; returns [0.95*0.25 - 0.05*0.5 - 0.05, 0.95*0.5 - 0.05, 0.95]
    kl = torch.full((1, 3), 0.1, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    _, returns = adv.reinforce_pp_advantages(torch.tensor([1.0], dtype=torch.float64), kl, mask, kl_coef=0.5, gamma=0.5)
    assert returns[0].tolist() == pytest.approx([0.1625, 0.425, 0.95])


def test_reinforce_pp_matches_loop_and_its_advantages_are_the_returns() -> None:
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([6, 4, 8, 2], 8, holes=True).double()
    rewards = torch.randn(4, generator=g, dtype=torch.float64)
    kl = torch.rand(4, 8, generator=g, dtype=torch.float64)
    a, returns = adv.reinforce_pp_advantages(rewards, kl, mask, kl_coef=0.1, gamma=0.9)
    tok = (-0.1 * kl * mask + adv.terminal_rewards(rewards, mask)).tolist()
    expected = torch.tensor(loop_returns(tok, mask.tolist(), 0.9), dtype=torch.float64)
    assert torch.allclose(returns, expected)
    assert torch.equal(a, returns)  # miles: whitened only with normalize_advantages (next test)


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"])
def test_normalize_advantages_decides_whitening_for_every_estimator(estimator: str) -> None:
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask([3, 5, 2, 4], 5, holes=True).double()
    inputs = AdvantageInputs(rewards_B=torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64),
                             group_B=torch.tensor([0, 0, 1, 1]), mask_BT=mask,
                             values_BT=torch.rand(4, 5, generator=g, dtype=torch.float64) * mask)  # fmt: skip
    raw, _ = compute_advantages(AlgoConfig(advantage_estimator=estimator), inputs)  # type: ignore[arg-type]
    white, _ = compute_advantages(AlgoConfig(advantage_estimator=estimator, normalize_advantages=True), inputs)  # type: ignore[arg-type]
    n = mask.sum()
    mean = (raw * mask).sum() / n
    std = (((raw - mean) * mask) ** 2).sum().div(n - 1).sqrt()
    assert torch.allclose(white, (raw - mean) / std * mask, atol=1e-6)
    assert not torch.allclose(white, raw, atol=1e-3)  # the flag changed them: raw ones are not whitened


def test_whiten_without_shifting_the_mean_adds_it_back() -> None:
    # x = [1, 3] (third masked): mean 2, unbiased std sqrt(2); (x - 2)/sqrt(2) + 2
    x = torch.tensor([[1.0, 3.0, 100.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    out = whiten(x, m, shift_mean=False)
    assert out[0].tolist() == pytest.approx([2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2), 0.0], rel=1e-6)


def test_reinforce_pp_baseline_subtracts_group_mean_first() -> None:
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, 2, dtype=torch.float64)
    kl = torch.zeros(4, 2, dtype=torch.float64)
    _, returns = adv.reinforce_pp_baseline_advantages(rewards, group, kl, mask, kl_coef=0.0, gamma=1.0)
    assert returns[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def loop_gae(r: list[float], v: list[float], m: list[float], gamma: float, lam: float) -> list[float]:
    idx = [t for t in range(len(r)) if m[t]]
    out = [0.0] * len(r)
    next_adv, next_value = 0.0, 0.0
    for t in reversed(idx):
        delta = r[t] + gamma * next_value - v[t]
        next_adv = delta + gamma * lam * next_adv
        next_value = v[t]
        out[t] = next_adv
    return out


def test_gae_hand_computed() -> None:
    # 2 tokens, V = [0.5, 0.2], reward 1 at the end, γ = 0.9, λ = 0.8:
    # δ1 = 1 - 0.2 = 0.8; δ0 = 0 + 0.9*0.2 - 0.5 = -0.32; A0 = -0.32 + 0.72*0.8 = 0.256
    r = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    a, ret = adv.gae_advantages(r, v, torch.ones(1, 2, dtype=torch.float64), gamma=0.9, lam=0.8)
    assert a[0].tolist() == pytest.approx([0.256, 0.8])
    assert ret[0].tolist() == pytest.approx([0.756, 1.0])


def test_gae_matches_loop_and_skips_masked_tokens() -> None:
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask([7, 5, 3, 8], 8, holes=True).double()
    r = torch.randn(4, 8, generator=g, dtype=torch.float64) * mask
    v = torch.randn(4, 8, generator=g, dtype=torch.float64)
    a, _ = adv.gae_advantages(r, v, mask, gamma=0.95, lam=0.9)
    for i in range(4):
        expected = loop_gae(r[i].tolist(), v[i].tolist(), mask[i].tolist(), 0.95, 0.9)
        assert a[i].tolist() == pytest.approx(expected, abs=1e-12)


def test_whiten_ignores_masked_entries() -> None:
    x = torch.tensor([[1.0, 3.0, 100.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    out = whiten(x, m)
    assert out[0, :2].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-6)
    assert out[0, 2].item() == 0.0


@pytest.mark.parametrize(
    "kl_type,kl",
    [
        ("k1", [0.5, -0.5]),
        ("k2", [0.125, 0.125]),
        ("low_var_kl", [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5]),  # e^-x - 1 + x
    ],
)
def test_the_reward_kl_follows_kl_loss_type(kl_type: str, kl: list[float]) -> None:
    # REINFORCE++, one sample of two tokens, log π_old − log π_ref = [0.5, -0.5], reward 1, kl_coef 0.1, γ = 1:
    # G_1 = 1 − 0.1·kl_1, G_0 = G_1 − 0.1·kl_0 (miles passes its kl_loss_type to the reward KL too)
    x = AdvantageInputs(rewards_B=torch.tensor([1.0], dtype=torch.float64), group_B=torch.tensor([0]),
                        mask_BT=torch.ones(1, 2, dtype=torch.float64),
                        kl_BT=torch.tensor([[0.5, -0.5]], dtype=torch.float64))  # fmt: skip
    config = AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1, kl_loss_type=kl_type)  # type: ignore[arg-type]
    a, _ = compute_advantages(config, x)
    g1 = 1 - 0.1 * kl[1]
    assert a[0].tolist() == pytest.approx([g1 - 0.1 * kl[0], g1], abs=1e-12)
