"""miles/slime's MIS extras, unbiased KL, CISPO and on-policy distillation, by hand and as properties:
batch-normalized weights, rejection sampling decoupled from the weights, the per-sample ESS of π_θ/π_old,
the KL loss weighted by π_θ/π_old."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from consumers.trainer import main
from miles_stream.errors import ConfigError
from miles_stream.models import build_tiny_model
from miles_stream.run_config import load_run_config
from miles_stream.trainer import correction as corr
from miles_stream.trainer import losses
from miles_stream.trainer.algo import AdvantageInputs, AlgoConfig, LossInputs, build_objective, compute_advantages

F64 = torch.float64


def weights(log_w: list[list[float]], mask: list[list[float]], **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.tensor(log_w, dtype=F64)
    m = torch.tensor(mask, dtype=F64)
    defaults: dict[str, object] = {"level": corr.token_level, "mode": corr.truncate_mode, "low": 0.0, "high": 10.0}
    w, new_mask, _ = corr.importance_weights(old, torch.zeros_like(old), m, **(defaults | kw))  # type: ignore[arg-type]
    return w, new_mask


def test_batch_normalize_token_level_by_hand() -> None:
    # raw weights 2, 1, 0.5 (mean 7/6): normalized 12/7, 6/7, 3/7; the masked 4th token stays 0
    w, _ = weights([[math.log(2), 0.0, math.log(0.5), 5.0]], [[1, 1, 1, 0]], batch_normalize=True)
    assert w[0].tolist() == pytest.approx([12 / 7, 6 / 7, 3 / 7, 0.0])


def test_batch_normalize_sequence_level_averages_over_samples() -> None:
    # sequence weights e^(ln 2 + ln 2) = 4 and e^0 = 1: mean over samples 2.5 (not over tokens: 3.0)
    log_w = [[math.log(2), math.log(2)], [0.0, 0.0]]
    w, _ = weights(log_w, [[1, 1], [1, 0]], level=corr.sequence_level, batch_normalize=True)
    assert w.flatten().tolist() == pytest.approx([1.6, 1.6, 0.4, 0.0])


def test_batch_normalize_counts_a_mask_mode_rejection_at_its_raw_weight() -> None:
    # mask mode [0.5, 2] rejects the 4 (weight 0 there), but the mean is (4 + 1 + 1) / 3 = 2, as slime
    w, new_mask = weights([[math.log(4), 0.0, 0.0]], [[1, 1, 1]], mode=corr.mask_mode, low=0.5, high=2.0,
                          batch_normalize=True)  # fmt: skip
    assert new_mask[0].tolist() == [0.0, 1.0, 1.0]
    assert w[0].tolist() == pytest.approx([0.0, 0.5, 0.5])


@pytest.mark.parametrize("seed", range(5))
def test_batch_normalized_token_weights_average_one(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    log_w = torch.randn(4, 7, generator=g, dtype=F64)
    mask = (torch.rand(4, 7, generator=g) > 0.3).to(F64)
    w, _ = weights(log_w.tolist(), mask.tolist(), mode=corr.clip_mode, low=0.2, high=3.0,
                          batch_normalize=True)  # fmt: skip
    assert ((w * mask).sum() / mask.sum()).item() == pytest.approx(1.0)


def test_rejection_sampling_has_its_own_level_and_bounds_and_leaves_the_weights() -> None:
    # token weights truncated at 10; RS at sequence level in [0.5, 2]: sample 0 (e^1.2 = 3.3) is rejected,
    # sample 1 (e^0.2) kept; the weights of kept tokens are the TIS ones
    log_w = [[0.6, 0.6], [0.1, 0.1]]
    w, new_mask = weights(log_w, [[1, 1], [1, 1]], rs_level=corr.sequence_level, rs_low=0.5, rs_high=2.0)
    assert new_mask.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert w[1].tolist() == pytest.approx([math.exp(0.1)] * 2)


def test_rejection_bounds_fall_back_to_the_tis_bounds() -> None:
    c = AlgoConfig(tis_mode="clip", tis_clip_low=0.5, tis_clip=3.0, use_rs=True)
    assert c.rs_bounds == (0.5, 3.0)
    assert AlgoConfig(tis_mode="clip", tis_clip=3.0, use_rs=True, rs_clip_low=0.8, rs_clip=1.2).rs_bounds == (0.8, 1.2)
    with pytest.raises(ConfigError, match="use_rs"):
        AlgoConfig(use_rs=True)


def test_rejection_lower_bound_falls_back_to_one_over_the_upper_without_a_tis_lower_bound() -> None:
    # truncate mode has no lower bound (tis_clip_low 0): miles rejects below 1 / upper, here 1 / 4 = 0.25
    assert AlgoConfig(tis_mode="truncate", tis_clip=4.0, use_rs=True).rs_bounds == (0.25, 4.0)
    assert AlgoConfig(tis_mode="truncate", tis_clip=4.0, use_rs=True, rs_clip=2.0).rs_bounds == (0.5, 2.0)
    assert AlgoConfig(tis_mode="truncate", use_rs=True, rs_clip_low=0.0).rs_bounds == (0.0, 2.0)  # asked for


def test_sample_ess_by_hand() -> None:
    # sample 0: w = 1, 3 -> (4)^2 / (2 * 10) = 0.8; sample 1: w = 1, 1, 1 -> 1; token-weighted (0.8*2 + 3) / 5
    log_ratio = torch.tensor([[0.0, math.log(3), 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=F64)
    assert corr.sample_ess(log_ratio, mask).item() == pytest.approx(0.92)


@pytest.mark.parametrize("seed", range(5))
def test_sample_ess_lies_in_its_range(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(3, 6, generator=g, dtype=F64) * 2
    mask = torch.ones(3, 6, dtype=F64)
    ess = corr.sample_ess(log_ratio, mask).item()
    assert 1 / 6 - 1e-9 <= ess <= 1 + 1e-9
    assert corr.sample_ess(torch.zeros(3, 6, dtype=F64), mask).item() == pytest.approx(1.0)


def kl_loss(unbiased: bool, logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(logp)
    x = LossInputs(logp_BT=logp, logp_old_BT=old, logp_rollout_BT=old, adv_BT=torch.zeros_like(logp),
                   mask_BT=mask, num_tokens=float(mask.sum()), num_samples=float(len(mask)),
                   logp_ref_BT=ref)  # fmt: skip
    config = AlgoConfig(kl_loss_coef=1.0, kl_loss_type="k1", use_unbiased_kl=unbiased)
    return build_objective(config)(x)[1]["kl_loss"]


def test_unbiased_kl_by_hand() -> None:
    # k1 = logp - ref = [0.5, -0.25]; ratios pi/pi_old = e^0.1, e^-0.2; token mean of their products
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64)
    old = torch.tensor([[-1.1, -1.8]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.75]], dtype=F64)
    expected = (math.exp(0.1) * 0.5 + math.exp(-0.2) * -0.25) / 2
    assert kl_loss(True, logp, old, ref).item() == pytest.approx(expected)
    assert kl_loss(False, logp, old, ref).item() == pytest.approx((0.5 - 0.25) / 2)


@pytest.mark.parametrize("seed", range(3))
def test_unbiased_kl_equals_the_plain_one_on_policy(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(2, 5, generator=g, dtype=F64)
    ref = -torch.rand(2, 5, generator=g, dtype=F64)
    assert kl_loss(True, logp, logp.clone(), ref).item() == pytest.approx(
        kl_loss(False, logp, logp.clone(), ref).item()
    )


def test_cispo_by_hand_and_its_gradient_flows_through_logp_only() -> None:
    # ratios e^0.5 (capped at 1.28), 1, e^-0.5 (capped at 0.8); A = 1, -1, 2
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64, requires_grad=True)
    log_ratio = torch.tensor([[0.5, 0.0, -0.5]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=F64)
    loss, metrics = losses.cispo_loss(log_ratio, logp, adv, torch.ones_like(adv), eps_clip=0.2, eps_clip_high=0.28)
    capped = [1.28, 1.0, 0.8]
    assert loss[0].tolist() == pytest.approx(
        [-c * a * lp for c, a, lp in zip(capped, [1, -1, 2], [-1, -2, -0.5], strict=True)]
    )
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 3)
    loss.sum().backward()  # type: ignore[no-untyped-call]
    assert logp.grad is not None and logp.grad[0].tolist() == pytest.approx([-1.28, 1.0, -1.6])
    assert log_ratio.grad is None or torch.all(log_ratio.grad == 0)


def test_cispo_refuses_dual_clip() -> None:
    with pytest.raises(ConfigError, match="eps_clip_c"):
        AlgoConfig(policy_loss="cispo", eps_clip_c=3.0)


def test_opd_subtracts_the_reverse_kl_to_the_teacher_before_whitening() -> None:
    # GRPO advantages of rewards 1, 0 in one group: +0.7071, -0.7071; reverse KL student - teacher per token
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    student = torch.tensor([[-1.0, -0.5, 9.0], [-2.0, -1.0, -0.1]], dtype=F64)
    teacher = torch.tensor([[-0.5, -0.5, 0.0], [-1.0, -3.0, -0.1]], dtype=F64)
    x = AdvantageInputs(rewards_B=torch.tensor([1.0, 0.0], dtype=F64), group_B=torch.tensor([0, 0]), mask_BT=mask,
                        student_BT=student, teacher_BT=teacher)  # fmt: skip
    plain, _ = compute_advantages(AlgoConfig(), x)
    opd, _ = compute_advantages(AlgoConfig(use_opd=True, opd_kl_coef=0.5), x)
    rkl = torch.tensor([[-0.5, 0.0, 0.0], [-1.0, 2.0, 0.0]], dtype=F64)
    assert torch.allclose(opd, plain - 0.5 * rkl)
    assert opd[0, 2].item() == plain[0, 2].item()  # off the mask: untouched


def test_distillation_without_a_teacher_names_the_key(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m")
    config = load_run_config(None, [f"trainer.model={model}", "algo.use_opd=true"])
    with pytest.raises(ConfigError, match=r"trainer\.teacher_model"):
        main(config)


@pytest.mark.parametrize("seed", range(5))
def test_rejection_sampling_only_removes_tokens(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    log_w = (torch.randn(4, 6, generator=g, dtype=F64) * 0.5).tolist()
    mask = (torch.rand(4, 6, generator=g) > 0.2).to(F64)
    _, plain = weights(log_w, mask.tolist())
    _, rejected = weights(log_w, mask.tolist(), rs_level=corr.geometric_level, rs_low=0.8, rs_high=1.25)
    _, everything = weights(log_w, mask.tolist(), rs_level=corr.token_level, rs_low=0.0, rs_high=math.inf)
    assert torch.all(rejected <= plain) and torch.equal(everything, plain)


@pytest.mark.parametrize("seed", range(5))
def test_cispo_and_ppo_have_the_same_gradient_on_policy(seed: int) -> None:
    # at logp == logp_old the ratio is 1 (inside any clip range): both gradients are -A * d logp
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(3, 5, generator=g, dtype=F64)).requires_grad_(True)
    adv, mask = torch.randn(3, 5, generator=g, dtype=F64), torch.ones(3, 5, dtype=F64)
    grads = []
    for loss_fn in ("ppo", "cispo"):
        log_ratio = losses.token_log_ratio(logp, logp.detach(), mask)
        if loss_fn == "ppo":
            loss, _ = losses.ppo_clip_loss(log_ratio, adv, mask, eps_clip=0.2, eps_clip_high=0.28)
        else:
            loss, _ = losses.cispo_loss(log_ratio, logp, adv, mask, eps_clip=0.2, eps_clip_high=0.28)
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], -adv)
