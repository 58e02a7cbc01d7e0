from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from miles_stream.errors import ConfigError
from miles_stream.rewards import (
    RewardError,
    RewardInput,
    RewardRegistry,
    final_answer,
    math_answer,
    normalize_answer,
    score_group,
    toy_addition,
)


def x(response: str, label: str | None = None) -> RewardInput:
    return RewardInput(prompt="p", response=response, label=label)


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{a} then \\boxed{x^{2}+1}", "x^{2}+1"),
        ("I think 3 apples, no, 42 apples", "42"),
        ("total: 1,234.5 dollars", "1,234.5"),
        ("no numbers here", None),
        ("\\boxed{unclosed", None),  # an unbalanced \boxed is no answer, and there is no number
    ],
)
def test_final_answer_takes_the_last_boxed_else_the_last_number(text: str, answer: str | None) -> None:
    assert final_answer(text) == answer


@pytest.mark.parametrize(
    "a,b",
    [("0.5", "1/2"), ("\\frac{1}{2}", "0.50"), ("1,234", "1234"), ("\\text{ 7 }", "7."), ("$-3$", "-3"), ("X", "x")],
)
def test_equivalent_answers_normalize_alike(a: str, b: str) -> None:
    assert normalize_answer(a) == normalize_answer(b)


def test_math_answer() -> None:
    assert math_answer(x("... = \\boxed{0.5}", "\\frac12")) == 0.0  # \frac12 without braces stays text
    assert math_answer(x("... = \\boxed{0.5}", "1/2")) == 1.0
    assert math_answer(x("the result is 12", "12")) == 1.0
    assert math_answer(x("the result is 13", "12")) == 0.0
    assert math_answer(x("12", None)) == 0.0


def test_toy_addition_rewards_exact_sums_and_gives_partial_credit() -> None:
    assert toy_addition(x("46", "46")) == 1.0
    assert toy_addition(x(" 46 ", "46")) == 1.0
    assert toy_addition(x("36", "46")) == pytest.approx(0.25)  # last digit right
    assert toy_addition(x("146", "46")) == pytest.approx(0.25)  # two right, one too many
    assert toy_addition(x("", "46")) == 0.0
    assert 0.0 <= toy_addition(x("9999999", "46")) < 1.0


async def test_sync_async_and_per_group_functions_score_alike() -> None:
    samples = [x("46", "46"), x("45", "46")]

    async def async_exact(s: RewardInput) -> float:
        await asyncio.sleep(0)
        return float(s.response == s.label)

    def ranked(group: Sequence[RewardInput]) -> list[float]:
        return [float(i == 0) for i, _ in enumerate(group)]

    ranked.per_group = True  # type: ignore[attr-defined]
    assert await score_group(toy_addition, samples, timeout_s=5) == [1.0, 0.25]
    assert await score_group(async_exact, samples, timeout_s=5) == [1.0, 0.0]
    assert await score_group(ranked, samples, timeout_s=5) == [1.0, 0.0]


async def test_a_reward_that_raises_hangs_or_returns_nan_is_a_reward_error() -> None:
    def broken(s: RewardInput) -> float:
        raise KeyError("label")

    def slow(s: RewardInput) -> float:
        time.sleep(0.5)
        return 1.0

    async def hangs(s: RewardInput) -> float:
        await asyncio.sleep(10)
        return 1.0

    def nan(s: RewardInput) -> float:
        return float("nan")

    def short(group: Sequence[RewardInput]) -> list[float]:
        return [1.0]

    short.per_group = True  # type: ignore[attr-defined]
    cases = [(broken, "raised KeyError"), (slow, "within 0.1s"), (hangs, "within 0.1s"),
             (nan, "not a finite number"), (short, "must return 2 values")]  # fmt: skip
    for fn, message in cases:
        with pytest.raises(RewardError, match=message):
            await score_group(fn, [x("1", "1"), x("2", "1")], timeout_s=0.1)


def test_registry_names_builtins_and_registered_functions() -> None:
    registry = RewardRegistry()
    assert registry.get("toy_addition") is toy_addition

    def mine(s: RewardInput) -> float:
        return 0.0

    registry.register("mine", mine)
    assert registry.get("mine") is mine
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("mine", toy_addition)
    with pytest.raises(ConfigError, match="unknown reward 'nope' \\(registered: exact_match, math_answer, mine"):
        registry.get("nope")
    assert "mine" not in RewardRegistry()._fns  # registries are separate objects, not a global
