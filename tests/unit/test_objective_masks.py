"""What the policy objective does with tokens outside the mask, non-finite values and rejected tokens."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from miles_stream.trainer.algo import AlgoConfig, LossInputs, SftObjective, build_objective


def inputs(**changes: torch.Tensor) -> LossInputs:
    """Two samples of four tokens, the last token of each outside the mask."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    logp = (-torch.rand(2, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    fields = {
        "logp_BT": logp,
        "logp_old_BT": logp.detach().clone(),
        "logp_rollout_BT": logp.detach() - 0.01,
        "adv_BT": torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64),
        "mask_BT": mask,
        "logp_ref_BT": logp.detach() - 0.2,
        "entropy_BT": torch.rand(2, 4, generator=g, dtype=torch.float64),
    }
    fields.update(changes)
    return LossInputs(num_tokens=float(mask.sum()), num_samples=2.0, **fields)  # type: ignore[arg-type]


CONFIG = AlgoConfig(kl_loss_coef=0.1, entropy_coef=0.01, tis_mode="truncate")


@pytest.mark.parametrize("field", ["logp_old_BT", "logp_rollout_BT", "adv_BT", "logp_ref_BT", "entropy_BT"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_outside_the_mask_changes_nothing(field: str, bad: float) -> None:
    objective = build_objective(CONFIG)
    clean = inputs()
    loss, _ = objective(clean)
    poisoned_field = getattr(clean, field).clone()
    poisoned_field[0, 3] = bad
    poisoned, poisoned_metrics = objective(inputs(**{field: poisoned_field}))
    assert torch.isfinite(poisoned) and poisoned.item() == pytest.approx(loss.item(), rel=1e-12)
    assert poisoned_metrics["nonfinite_frac"].item() == 0.0


def test_a_non_finite_value_on_an_active_token_is_zeroed_and_counted() -> None:
    x = inputs()
    rollout = x.logp_rollout_BT.clone()
    rollout[1, 1] = math.nan
    loss, metrics = build_objective(CONFIG)(inputs(logp_BT=x.logp_BT, logp_rollout_BT=rollout))
    assert torch.isfinite(loss)
    assert metrics["nonfinite_frac"].item() == pytest.approx(1 / 6)
    loss.backward()  # type: ignore[no-untyped-call]
    assert x.logp_BT.grad is not None and torch.isfinite(x.logp_BT.grad).all()


def test_sft_objective_ignores_a_nan_outside_the_mask() -> None:
    x = inputs()
    logp = x.logp_BT.detach().clone()
    logp[0, 3] = math.nan
    loss, _ = SftObjective(token_mean=True)(inputs(logp_BT=logp.requires_grad_(True)))
    assert torch.isfinite(loss)


def test_a_rejected_token_gets_no_gradient_from_any_term() -> None:
    # tis_mode=mask with [0.5, 2]: token (0, 1) has ratio e^3 and is rejected; the advantages are 0, so only
    # the KL and entropy terms could still push it (in miles the rejection mask applies to every term)
    config = AlgoConfig(kl_loss_coef=0.1, entropy_coef=0.01, tis_mode="mask", tis_clip_low=0.5, tis_clip=2.0)
    x = inputs(adv_BT=torch.zeros(2, 4, dtype=torch.float64))
    rollout = x.logp_rollout_BT.clone()
    rollout[0, 1] = x.logp_old_BT[0, 1] - 3.0
    entropy = x.entropy_BT.clone().requires_grad_(True)
    loss, _ = build_objective(config)(inputs(logp_BT=x.logp_BT, adv_BT=x.adv_BT, logp_rollout_BT=rollout,
                                             entropy_BT=entropy))  # fmt: skip
    loss.backward()  # type: ignore[no-untyped-call]
    assert x.logp_BT.grad is not None and entropy.grad is not None
    assert x.logp_BT.grad[0, 1].item() == 0.0 and entropy.grad[0, 1].item() == 0.0
    assert x.logp_BT.grad[0, 0].item() != 0.0 and entropy.grad[0, 0].item() != 0.0  # kept tokens still learn


def two_tokens(adv: float, logp: list[float], rollout: list[float], ref: list[float]) -> LossInputs:
    """One sample of two tokens: old logprobs -1 each, entropy 2 each, k1 KL and entropy terms to weigh."""
    mask = torch.ones(1, 2, dtype=torch.float64)
    return LossInputs(logp_BT=torch.tensor([logp], dtype=torch.float64, requires_grad=True),
                      logp_old_BT=torch.tensor([[-1.0, -1.0]], dtype=torch.float64),
                      logp_rollout_BT=torch.tensor([rollout], dtype=torch.float64),
                      adv_BT=torch.full((1, 2), adv, dtype=torch.float64), mask_BT=mask,
                      logp_ref_BT=torch.tensor([ref], dtype=torch.float64),
                      entropy_BT=torch.tensor([[2.0, 2.0]], dtype=torch.float64),
                      num_tokens=2.0, num_samples=1.0)  # fmt: skip


def test_opsm_drops_the_policy_gradient_only_and_keeps_the_kl_and_entropy_terms() -> None:
    # old = rollout = -1, logp = -1.5, A = -1: drift 0.5 > delta, so OPSM drops the policy-gradient term.
    # Left: KL k1 mean(logp - ref) = -0.5 (coef 1) and -0.1 * mean entropy 2 = -0.2; d/dlogp = 1/2 per token
    config = AlgoConfig(kl_loss_coef=1.0, kl_loss_type="k1", entropy_coef=0.1, use_opsm=True, opsm_delta=1e-4)
    x = two_tokens(-1.0, [-1.5, -1.5], [-1.0, -1.0], [-1.0, -1.0])
    loss, metrics = build_objective(config)(x)
    loss.backward()  # type: ignore[no-untyped-call]
    assert metrics["pg_loss"].item() == 0.0
    assert loss.item() == pytest.approx(-0.7, abs=1e-12)
    assert x.logp_BT.grad is not None and x.logp_BT.grad[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-12)


def test_opsm_that_drops_nothing_leaves_the_loss_of_tis_rejected_tokens_out() -> None:
    # tis_mode=mask [0.5, 2]: token 2's weight exp(-1 - -3) = e^2 is rejected; A = +1, so OPSM drops nothing.
    # logp = old = -1, ref = -2: token 1 alone counts: (pg -1 + KL 1) / 2 - 0.1 * 2 / 2 = -0.1
    base = AlgoConfig(kl_loss_coef=1.0, kl_loss_type="k1", entropy_coef=0.1, tis_mode="mask", tis_clip_low=0.5,
                      tis_clip=2.0)  # fmt: skip
    for config in (base, replace(base, use_opsm=True)):
        loss, _ = build_objective(config)(two_tokens(1.0, [-1.0, -1.0], [-1.0, -3.0], [-2.0, -2.0]))
        assert loss.item() == pytest.approx(-0.1, abs=1e-12), config.use_opsm
