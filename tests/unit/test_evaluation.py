"""The evaluator's math and records: unbiased pass@k against hand-computed values and a brute-force count over
every k-subset; the result record's round trip and refusals; and one evaluation of the demo's tiny model through
the engine registry, whose greedy pass@1 must equal the demo task's own greedy accuracy."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles_stream.config import build
from miles_stream.demo.task import greedy_accuracy, write_task
from miles_stream.engines.base import SamplingParams
from miles_stream.errors import ConfigError, SchemaError
from miles_stream.evaluation.config import EvalConfig
from miles_stream.evaluation.evaluator import Evaluator, Stopped
from miles_stream.evaluation.passk import mean_pass_at_k, pass_at_k
from miles_stream.evaluation.record import EvalResult, decode_result, encode_result
from miles_stream.feeder import FeederConfig, load_rows
from miles_stream.rewards import RewardRegistry
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.engines import open_engine


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 1 / 4),  # pass@1 is the share correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (8, 0, 8, 0.0),
        (3, 3, 1, 1.0),
        (6, 2, 5, 1.0),  # n - c < k: every 5 of 6 holds a correct one
        (8, 1, 8, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_share_of_k_subsets_holding_a_correct_sample() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                share = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(share, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n_and_refuses_impossible_counts() -> None:
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100))
    assert mean_pass_at_k([0, 4], n=4, k=2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"k=5 must be within 1\.\.n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c=5"):
        pass_at_k(4, 5, 1)


def test_eval_config_names_the_key_to_change() -> None:
    with pytest.raises(ConfigError, match=r"eval.pass_k: each k must be within 1..eval.n_samples \(4\)"):
        build(EvalConfig, {"n_samples": 4, "pass_k": [8]})
    with pytest.raises(ConfigError, match=r"eval\.every"):
        build(EvalConfig, {"every": 0})
    assert build(EvalConfig, {"n_samples": 8}).ks == (8,)
    assert build(EvalConfig, {"n_samples": 0}).ks == ()


def _result(**changes: object) -> EvalResult:
    fields: dict[str, object] = dict(version=3, evaluator_id="e", dataset="d.jsonl", prompts=10, n_samples=4,
                                     pass_at_1=0.5, pass_at_k={1: 0.4, 4: 0.9}, reward_mean=0.45,
                                     greedy_reward_mean=0.5, response_tokens_mean=3.5, truncated_rate=0.1, eval_s=1.0,
                                     skipped=2, created_at=1.5)  # fmt: skip
    return EvalResult(**(fields | changes))  # type: ignore[arg-type]


def test_eval_record_round_trips_and_malformed_entries_are_refused() -> None:
    r = _result()
    assert decode_result(encode_result(r)) == r
    assert r.as_row()["pass_at_k"] == {"1": 0.4, "4": 0.9}
    assert r.scalars()["eval/pass_at_k/4"] == 0.9
    with pytest.raises(SchemaError, match="not valid msgpack"):
        decode_result(b"\xc1")
    with pytest.raises(SchemaError, match="pass_at_1"):
        decode_result(encode_result(_result(pass_at_1=float("nan"))))
    with pytest.raises(SchemaError, match="version"):
        decode_result(encode_result(_result(version="3")))


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_task(tmp_path_factory.mktemp("task"))


def test_greedy_pass_at_1_of_the_demo_model_equals_its_greedy_accuracy(task: tuple[Path, Path]) -> None:
    model_dir, prompts = task
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = greedy_accuracy(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer)

    async def evaluate() -> tuple[EvalResult, bool]:
        rollout = RolloutConfig(model=str(model_dir), max_batch=64)
        engine, follow = await open_engine(rollout, None, "unused")  # the registry: native, no server list
        assert follow is None
        config = EvalConfig(path=str(prompts), n_samples=4, pass_k=(1, 4))
        evaluator = Evaluator(config, engine=engine, tokenizer=tokenizer, reward_fn=RewardRegistry().get("exact_match"),
                              rows=load_rows(FeederConfig(path=str(prompts))),
                              sampling=SamplingParams(max_new_tokens=1), weights=None,  # type: ignore[arg-type]
                              redis=None, keys=None, evaluator_id="t", max_batch=64)  # fmt: skip
        try:
            result = await evaluator.evaluate(0)
            stop = asyncio.Event()
            stop.set()
            try:
                await evaluator.evaluate(0, stop)
                stopped = False
            except Stopped:
                stopped = True
        finally:
            await engine.close()
        return result, stopped

    result, stopped = asyncio.run(evaluate())
    assert result.prompts == 100 and result.n_samples == 4
    assert result.pass_at_1 == pytest.approx(expected)  # the greedy response is the argmax token
    assert result.greedy_reward_mean == pytest.approx(expected)  # exact match: reward 1 exactly when correct
    assert 0.0 <= result.pass_at_k[1] <= result.pass_at_k[4] <= 1.0
    assert result.pass_at_k[1] == pytest.approx(result.reward_mean)  # exact match: pass@1 of samples = mean reward
    assert result.response_tokens_mean == 1.0  # max_new_tokens 1
    assert 0.0 <= result.truncated_rate <= 1.0
    assert stopped  # a stop set before the first engine call ends the evaluation
