"""Policy losses, off-policy correction and the composed objective: hand values, a loop reference, properties."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from miles_stream.trainer import correction as corr
from miles_stream.trainer import losses
from miles_stream.trainer.algo import (
    AdvantageInputs,
    AlgoConfig,
    LossInputs,
    build_objective,
    compute_advantages,
)

F64 = torch.float64


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ---- hand-computed ----------------------------------------------------------------------------------------
def test_ppo_clip_higher_hand_computed() -> None:
    log_ratio = t([[math.log(1.6), math.log(0.5), math.log(1.1)]])
    adv = t([[1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=F64)
    loss, m = losses.ppo_clip_loss(log_ratio, adv, mask, eps_clip=0.2, eps_clip_high=0.28)
    # r=1.6, A=1: -min(1.6, 1.28) = -1.28;  r=0.5, A=-1: -min(-0.5, -0.8) = 0.8;  r=1.1: -1.1
    assert loss[0].tolist() == pytest.approx([-1.28, 0.8, -1.1])
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 3)


def test_dual_clip_bounds_negative_advantage_loss() -> None:
    log_ratio = t([[math.log(5.0), math.log(5.0)]])
    adv = t([[-1.0, 1.0]])
    loss, m = losses.ppo_clip_loss(
        log_ratio, adv, torch.ones(1, 2, dtype=F64), eps_clip=0.2, eps_clip_high=0.2, dual_clip_c=3.0
    )
    # A=-1, r=5: PPO gives max(5, 1.2) = 5, dual clip caps at c·|A| = 3;  A=+1: -min(5, 1.2) = -1.2
    assert loss[0].tolist() == pytest.approx([3.0, -1.2])
    assert m["pg_dual_clipfrac"].item() == pytest.approx(0.5)


def test_gspo_ratio_is_one_per_sequence() -> None:
    logp = t([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    old = t([[-1.5, -1.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    lr = losses.sequence_log_ratio(logp, old, mask)
    assert lr[0].tolist() == pytest.approx([-0.25] * 3)  # mean(0.5, -1.0) over the two masked tokens
    assert lr[1].tolist() == pytest.approx([0.0] * 3)


@pytest.mark.parametrize(
    "fn,expected",
    [
        (losses.kl_k1, 0.5),
        (losses.kl_k2, 0.125),
        (losses.kl_k3, math.exp(-0.5) - 1 + 0.5),
        (losses.kl_low_var, math.exp(-0.5) - 1 + 0.5),
    ],
)
def test_kl_estimators_hand_computed(fn: object, expected: float) -> None:
    assert fn(t([[0.5]])).item() == pytest.approx(expected)  # type: ignore[operator]


def test_low_var_kl_is_clamped() -> None:
    assert losses.kl_low_var(t([[-30.0]])).item() == 10.0


def test_value_loss_clipping_hand_computed() -> None:
    v, old, ret = t([[1.0]]), t([[0.0]]), t([[2.0]])
    loss, m = losses.value_loss(v, old, ret, torch.ones(1, 1, dtype=F64), value_clip=0.2)
    # unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 0.5 * 3.24
    assert loss.item() == pytest.approx(1.62)
    assert m["vf_clipfrac"].item() == 1.0


def test_vf_clipfrac_counts_values_that_moved_past_the_clip_whichever_branch_wins() -> None:
    # V - V_old: 1, 0.1, -0.5 against clip 0.2. Token 0 (R = 0): unclipped 1 > clipped 0.04, the max takes the
    # unclipped branch, but V moved past the clip; miles counts |V - V_old| > clip: 2 of 3
    v, old, ret = t([[1.0, 0.1, -0.5]]), t([[0.0, 0.0, 0.0]]), t([[0.0, 0.0, 0.0]])
    _, m = losses.value_loss(v, old, ret, torch.ones(1, 3, dtype=F64), value_clip=0.2)
    assert m["vf_clipfrac"].item() == pytest.approx(2 / 3)


def test_tis_truncate_hand_computed() -> None:
    old = t([[0.0, 0.0, 0.0]])
    rollout = t([[math.log(4.0), 0.0, -math.log(4.0)]])  # w = 0.25, 1, 4
    w, mask, m = corr.importance_weights(
        old, rollout, torch.ones(1, 3, dtype=F64), level=corr.token_level, mode=corr.truncate_mode, low=0.0, high=2.0
    )
    assert w[0].tolist() == pytest.approx([0.25, 1.0, 2.0])
    assert m["tis_mean"].item() == pytest.approx(5.25 / 3)
    assert m["tis_clipfrac"].item() == pytest.approx(1 / 3)
    assert mask.sum().item() == 3


def test_mis_mask_drops_tokens_outside_bounds() -> None:
    old = t([[0.0, 0.0, 0.0]])
    rollout = t([[math.log(4.0), 0.0, -math.log(4.0)]])
    w, mask, m = corr.importance_weights(
        old, rollout, torch.ones(1, 3, dtype=F64), level=corr.token_level, mode=corr.mask_mode, low=0.5, high=2.0
    )
    assert mask[0].tolist() == [0.0, 1.0, 0.0]
    assert w[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert m["tis_masked_frac"].item() == pytest.approx(2 / 3)


def test_sequence_and_geometric_levels_hand_computed() -> None:
    old = t([[0.0, 0.0, 0.0]])
    rollout = t([[-0.2, -0.4, 5.0]])
    mask = t([[1, 1, 0]])
    seq = corr.sequence_level((old - rollout) * mask, mask)
    geo = corr.geometric_level((old - rollout) * mask, mask)
    assert seq[0].tolist() == pytest.approx([0.6] * 3)
    assert geo[0].tolist() == pytest.approx([0.3] * 3)


def test_veto_masks_the_whole_sample() -> None:
    old = t([[0.0, 0.0], [0.0, 0.0]])
    rollout = t([[0.0, 20.0], [0.1, 0.1]])  # sample 0 holds a token with w = e^-20 < 1e-4
    _, mask, m = corr.importance_weights(
        old,
        rollout,
        torch.ones(2, 2, dtype=F64),
        level=corr.token_level,
        mode=corr.truncate_mode,
        low=0.0,
        high=2.0,
        veto_threshold=1e-4,
    )
    assert mask.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert m["tis_veto_frac"].item() == 0.5


def test_opsm_drops_negative_advantage_tokens_of_samples_that_drifted() -> None:
    # drift mean(rollout - logp): 1, 1, 0, 1 against delta 0.5; sample 3's advantages change sign (GAE, KL
    # shaping, OPD): only its negative token goes (miles masks per token, not by the sample's mean advantage)
    logp = t([[-2.0, -2.0], [-2.0, -2.0], [-2.0, -2.0], [-2.0, -2.0]])
    rollout = t([[-1.0, -1.0], [-1.0, -1.0], [-2.0, -2.0], [-1.0, -1.0]])
    adv = t([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [3.0, -1.0]])
    keep = corr.opsm_keep(logp, rollout, adv, torch.ones(4, 2, dtype=F64), delta=0.5)
    assert keep.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]


def test_effective_sample_size() -> None:
    ones = torch.ones(1, 4, dtype=F64)
    assert corr.effective_sample_size(ones, ones).item() == pytest.approx(1.0)
    assert corr.effective_sample_size(t([[1.0, 0, 0, 0]]), ones).item() == pytest.approx(0.25)


# ---- slow reference ------------------------------------------------------------------------------------
def reference_objective(x: dict[str, list[list[float]]], c: AlgoConfig) -> float:
    """PPO clip-higher + token-level TIS truncate + k3 KL + entropy, token-mean, in plain Python loops."""
    total_pg = total_kl = total_ent = 0.0
    n = sum(sum(row) for row in x["mask"])
    for i in range(len(x["mask"])):
        for j in range(len(x["mask"][i])):
            if not x["mask"][i][j]:
                continue
            r = math.exp(max(-20, min(20, x["logp"][i][j] - x["old"][i][j])))
            a = x["adv"][i][j]
            clipped = min(max(r, 1 - c.eps_clip), 1 + c.clip_high)
            pg = max(-a * r, -a * clipped)
            w = min(math.exp(x["old"][i][j] - x["rollout"][i][j]), c.tis_clip)
            total_pg += pg * w
            d = x["logp"][i][j] - x["ref"][i][j]
            total_kl += math.exp(-d) - 1 + d
            total_ent += x["ent"][i][j]
    return (total_pg + c.kl_loss_coef * total_kl - c.entropy_coef * total_ent) / n


def random_batch(B: int = 6, T: int = 9, seed: int = 0, spread: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    base = -torch.rand(B, T, generator=g, dtype=F64) * 3
    return {
        "logp": base + spread * torch.randn(B, T, generator=g, dtype=F64),
        "old": base + spread * torch.randn(B, T, generator=g, dtype=F64),
        "rollout": base + spread * torch.randn(B, T, generator=g, dtype=F64),
        "ref": base + spread * torch.randn(B, T, generator=g, dtype=F64),
        "ent": torch.rand(B, T, generator=g, dtype=F64),
        "adv": torch.randn(B, 1, generator=g, dtype=F64).expand(B, T) * mask,
        "mask": mask,
    }


def inputs(b: dict[str, torch.Tensor], **kw: object) -> LossInputs:
    return LossInputs(
        logp_BT=b["logp"],
        logp_old_BT=b["old"],
        logp_rollout_BT=b["rollout"],
        adv_BT=b["adv"],
        mask_BT=b["mask"],
        logp_ref_BT=b["ref"],
        entropy_BT=b["ent"],
        num_tokens=kw.get("num_tokens", b["mask"].sum()),
        num_samples=kw.get("num_samples", b["mask"].shape[0]),
    )


@pytest.mark.parametrize("seed", range(5))
def test_objective_matches_loop_reference(seed: int) -> None:
    c = AlgoConfig(
        eps_clip=0.2,
        eps_clip_high=0.28,
        kl_loss_coef=0.1,
        kl_loss_type="k3",
        entropy_coef=0.01,
        tis_mode="truncate",
        tis_clip=1.5,
    )
    b = random_batch(seed=seed)
    loss, _ = build_objective(c)(inputs(b))
    plain = {k: v.tolist() for k, v in b.items()}
    assert loss.item() == pytest.approx(reference_objective(plain, c), rel=1e-10, abs=1e-12)


# ---- properties --------------------------------------------------------------------------------------------
CORRECTIONS = [
    {"tis_mode": mode, "tis_level": level, "tis_clip_low": 0.0 if mode == "truncate" else 0.5}
    for mode, level in itertools.product(["truncate", "clip", "mask"], ["token", "sequence", "geometric"])
]


@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: f"{c['tis_mode']}-{c['tis_level']}")
def test_equal_logprobs_make_every_correction_the_identity_and_the_loss_vanilla_pg(
    correction: dict[str, object],
) -> None:
    b = random_batch(seed=3)
    b["old"] = b["rollout"] = b["logp"].detach().clone()
    logp = b["logp"].clone().requires_grad_(True)
    c = AlgoConfig(use_opsm=True, tis_veto_threshold=1e-4, **correction)  # type: ignore[arg-type]
    loss, m = build_objective(c)(inputs({**b, "logp": logp}))
    loss.backward()
    n = b["mask"].sum()
    assert loss.item() == pytest.approx((-(b["adv"] * b["mask"]).sum() / n).item(), abs=1e-12)
    assert logp.grad is not None
    assert torch.allclose(logp.grad, -b["adv"] * b["mask"] / n, atol=1e-12)
    assert m["tis_mean"].item() == pytest.approx(1.0)
    assert m["tis_masked_frac"].item() == 0.0
    assert m["tis_ess"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("estimator", ["grpo", "gspo"])
def test_micro_batch_split_leaves_the_gradient_unchanged(reduction: str, estimator: str) -> None:
    b = random_batch(B=8, seed=7)
    c = AlgoConfig(
        advantage_estimator=estimator,
        loss_reduction=reduction,
        kl_loss_coef=0.05,
        entropy_coef=0.01,  # type: ignore[arg-type]
        tis_mode="mask",
        tis_level="geometric",
        tis_clip_low=0.5,
        tis_clip=2.0,
        use_opsm=True,
    )
    objective = build_objective(c)
    whole = b["logp"].clone().requires_grad_(True)
    objective(inputs({**b, "logp": whole}))[0].backward()
    split = b["logp"].clone().requires_grad_(True)
    n_tok, n_seq = b["mask"].sum(), b["mask"].shape[0]
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        part = {k: v[rows] for k, v in b.items()}
        part["logp"] = split[rows]
        objective(inputs(part, num_tokens=n_tok, num_samples=n_seq))[0].backward()
    assert whole.grad is not None and split.grad is not None
    assert torch.allclose(whole.grad, split.grad, atol=1e-12)


@pytest.mark.parametrize("estimator", ["grpo", "gspo"])
def test_masked_tokens_get_zero_gradient(estimator: str) -> None:
    b = random_batch(seed=11)
    logp = b["logp"].clone().requires_grad_(True)
    c = AlgoConfig(advantage_estimator=estimator, kl_loss_coef=0.1, entropy_coef=0.1, tis_mode="clip", tis_clip_low=0.5)  # type: ignore[arg-type]
    build_objective(c)(inputs({**b, "logp": logp}))[0].backward()
    assert logp.grad is not None
    assert torch.equal(logp.grad * (1 - b["mask"]), torch.zeros_like(logp.grad))
    assert (logp.grad * b["mask"]).abs().sum() > 0


@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: f"{c['tis_mode']}-{c['tis_level']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_log_ratios_give_finite_loss_and_gradient(correction: dict[str, object], dtype: torch.dtype) -> None:
    b = {k: v.to(dtype) for k, v in random_batch(seed=5).items()}
    b["logp"] = b["logp"] + 1000 * torch.sign(torch.randn_like(b["logp"]))
    b["rollout"] = b["rollout"] - 500
    b["ref"] = b["ref"] + 800
    logp = b["logp"].clone().requires_grad_(True)
    for estimator, kl_type in [("grpo", "k3"), ("gspo", "low_var_kl"), ("grpo", "k2")]:
        c = AlgoConfig(
            advantage_estimator=estimator, kl_loss_coef=0.1, kl_loss_type=kl_type, eps_clip_c=3.0, **correction
        )  # type: ignore[arg-type]
        loss, metrics = build_objective(c)(inputs({**b, "logp": logp}))
        loss.backward()
        assert torch.isfinite(loss)
        assert logp.grad is not None and torch.isfinite(logp.grad).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())
        logp.grad = None


def test_importance_weights_carry_no_gradient() -> None:
    old = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    rollout = torch.full((2, 3), -0.1, dtype=F64, requires_grad=True)
    w, _, _ = corr.importance_weights(
        old, rollout, torch.ones(2, 3, dtype=F64), level=corr.token_level, mode=corr.truncate_mode, low=0.0, high=2.0
    )
    assert not w.requires_grad


def test_compute_advantages_dispatches_by_name() -> None:
    mask = torch.ones(4, 3, dtype=F64)
    x = AdvantageInputs(
        rewards_B=torch.tensor([1.0, 0, 1, 1], dtype=F64),
        group_B=torch.tensor([0, 0, 1, 1]),
        mask_BT=mask,
        values_BT=torch.zeros(4, 3, dtype=F64),
    )
    grpo, _ = compute_advantages(AlgoConfig(advantage_estimator="grpo"), x)
    assert grpo[2:].abs().sum() == 0 and grpo[0, 0] > 0 > grpo[1, 0]
    _, returns = compute_advantages(AlgoConfig(advantage_estimator="ppo"), x)
    assert returns is not None and returns[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="needs critic values"):
        compute_advantages(AlgoConfig(advantage_estimator="ppo"), dataclasses.replace(x, values_BT=None))


def test_kl_loss_without_reference_is_a_clear_error() -> None:
    b = random_batch()
    x = dataclasses.replace(inputs(b), logp_ref_BT=None)
    with pytest.raises(ValueError, match="needs reference logprobs"):
        build_objective(AlgoConfig(kl_loss_coef=0.1))(x)
