"""The long-answer scratchpad task: worked answers are right and as long as promised, the reward checks the
sum after '#', the files it writes train with `train --sft` and feed the GRPO recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from miles_stream.rewards import RewardInput, RewardRegistry
from miles_stream.run_config import load_run_config
from miles_stream.tasks.scratchpad import CHARSET, MAX_DIGITS, MIN_DIGITS, problem, worked, write_task

ROOT = Path(__file__).parents[2]


def test_worked_answers_add_up_and_spell_out_each_column() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        prompt, answer, label = problem(rng)
        a, b = prompt.rstrip("=").split("+")
        assert len(a) == len(b) and MIN_DIGITS <= len(a) <= MAX_DIGITS
        assert int(label) == int(a) + int(b) and len(label) == len(a) + 1
        steps = answer.split(";")
        assert steps[-1] == "#" + label and len(steps) == len(a) + 1
        for i, step in enumerate(steps[:-1]):  # right to left: digit + digit + carry = two digits
            x, y, c = step.split("=")[0].split("+")
            assert (x, y) == (a[-1 - i], b[-1 - i]) and int(step[-2:]) == int(x) + int(y) + int(c)
        assert set(prompt + answer) <= set(CHARSET)
    assert worked([9, 9], [0, 1]) == ("9+1+0=10;9+0+1=10;#100", "100")


def test_answers_are_64_to_512_tokens_with_a_long_tail() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([len(problem(rng)[1]) + 1 for _ in range(5000)])  # + the end of sequence
    assert lengths.min() >= 60 and lengths.max() <= 512
    assert np.median(lengths) < 200 and np.percentile(lengths, 95) > 400  # mostly short, some long


def test_the_reward_is_the_sum_after_the_last_hash() -> None:
    reward = RewardRegistry().get("scratchpad_addition")
    score = lambda response: reward(RewardInput(prompt="", response=response, label="100"))  # noqa: E731
    assert score("9+1+0=10;9+0+1=10;#100") == 1.0
    assert score("9+1+0=10;#99;#100") == 1.0  # the last one counts
    assert score("9+1+0=10;9+0+1=10;#101") == 0.0
    assert score("9+1+0=10;9+0+1=10;100") == 0.0  # no answer given
    assert reward(RewardInput(prompt="", response="#100", label=None)) == 0.0


def test_the_files_it_writes_fit_the_recipes(tmp_path: Path) -> None:
    paths = write_task(tmp_path, size="small", train=20, sft=10, held_out=5)
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    prompts = [json.loads(line) for line in paths["prompts"].read_text().splitlines()]
    assert len(sft) == 10 and set(sft[0]) == {"prompt", "response"}
    assert len(prompts) == 20 and set(prompts[0]) == {"prompt", "label"}
    held_out = {json.loads(line)["prompt"] for line in paths["eval"].read_text().splitlines()}
    assert not held_out & {p["prompt"] for p in prompts}
    assert (paths["model"] / "config.json").is_file()
    sft_config = load_run_config(ROOT / "configs" / "scratchpad-sft.yaml", [f"trainer.model={paths['model']}"])
    grpo = load_run_config(ROOT / "configs" / "scratchpad-grpo.yaml")
    assert sft_config.sft.batch_size == 64 and grpo.rollout.reward == "scratchpad_addition"
    longest = max(len(p["prompt"]) for p in prompts) + grpo.rollout.sampling.max_new_tokens
    assert longest <= grpo.rollout.max_seq_len <= 1024  # the model's max_position


def test_the_cpu_variant_draws_its_digit_range_and_forgets_carries_only_in_the_warm_start(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sizes = [len(problem(rng, (1, 12))[0].split("+")[0]) for _ in range(3000)]
    assert min(sizes) == 1 and max(sizes) == 12 and np.median(sizes) <= 4  # long-tailed towards 12
    # a forgotten carry is written and added as 0: the answer agrees with itself and misses the sum
    assert worked([9, 9], [0, 1], [False, True]) == ("9+1+0=10;9+0+0=09;#090", "090")
    clean = write_task(tmp_path / "clean", size="small", train=5, sft=400, held_out=5, digits=(1, 12))
    noisy = write_task(tmp_path / "noisy", size="small", train=5, sft=400, held_out=5, digits=(1, 12),
                       carry_noise=0.5)  # fmt: skip
    rows = [[json.loads(line) for line in p["sft"].read_text().splitlines()] for p in (clean, noisy)]
    assert [r["prompt"] for r in rows[0]] == [r["prompt"] for r in rows[1]]  # the same problems
    carries = [s for r in rows[0] for s in r["response"].split(";")[:-1] if s[4] == "1"]
    dropped = sum(a != b for a, b in zip(rows[0], rows[1], strict=True))
    assert carries and 0.3 < dropped / len(rows[0]) < 0.9  # about half the answers with a carry are now wrong
    for p in ("prompts", "eval"):  # the RL prompts and labels are the true sums, whatever the noise
        assert clean[p].read_text() == noisy[p].read_text()
