"""What the policy objective does with tokens outside the mask, non-finite values and rejected tokens."""

from __future__ import annotations

import math

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
