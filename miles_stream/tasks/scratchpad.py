"""A task with long answers: column addition written out digit by digit, the sum last.

    prompt  "4821+0937="        both operands n digits (zero-padded), n from 6 to 50
    answer  "1+7+0=08;2+3+0=05;8+9+0=17;4+0+1=05;#05758"
             one column a time from the right: digit + digit + carry in = two-digit sum (its first digit is
             the carry out); after '#', the n + 1 digits of the sum

An answer is 10n + 2 characters of a character vocabulary: 62 tokens at n = 6, 502 at n = 50, plus the end
of sequence. n is drawn as 6 + floor(45 u^2) (u uniform), so a batch is mostly short with a long tail: the
median answer is 172 tokens, the top decile 413 and more. `--digits LO-HI` draws n as LO + floor((HI-LO+1) u^2)
instead: `--digits 1-12 --size cpu --carry-noise 0.5` is the CPU-sized task (answers of 13 to 123 tokens,
median 33, top decile 103). The reward (`scratchpad_addition`, rewards/builtin.py) is 1 when the digits after
the last '#' are the sum, else 0; the worked answers (`sft.jsonl`) are the warm start. `--carry-noise q`
makes that warm start flawed in one learnable way: each carry in of a worked answer is forgotten with
probability q (written and added as 0), so the SFT model drops carries about that often, an answer with k
carries is right about (1 - q)^k of the time, and RL has one decision to sharpen that matters more the longer
the answer (the CPU variant of issue 37: from an exact warm start the tiny model learned nothing in minutes).

    python -m miles_stream.tasks.scratchpad WORK [--size small|cpu|0.1b] [--digits LO-HI] [--carry-noise Q]

writes WORK/model (a random-initialised Qwen3 of that size, this task's vocabulary), WORK/sft.jsonl
(prompt, response), WORK/prompts.jsonl (prompt, label) and WORK/eval.jsonl (held out, seeded apart).
Recipes: configs/scratchpad-sft.yaml, then configs/scratchpad-grpo.yaml.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from miles_stream.models import TinyModelConfig, build_tiny_model

CHARSET = "0123456789+=;#"
MIN_DIGITS, MAX_DIGITS = 6, 50
SIZES = {
    "small": TinyModelConfig(kind="dense", charset=CHARSET, hidden_size=64, num_layers=2, intermediate_size=128,
                             max_position=1024, init_std=0.1),
    # about 0.4M parameters: learns the 1-12 digit task on two CPU cores in minutes (docs/benchmarks.md)
    "cpu": TinyModelConfig(kind="dense", charset=CHARSET, hidden_size=128, num_layers=3, num_heads=4,
                           num_kv_heads=2, intermediate_size=384, max_position=256, init_std=0.05),
    # about 0.1B parameters: Qwen3-shaped, 12 layers, hidden 768, 12 query / 4 key-value heads
    "0.1b": TinyModelConfig(kind="dense", charset=CHARSET, hidden_size=768, num_layers=12, num_heads=12,
                            num_kv_heads=4, intermediate_size=2048, max_position=1024),
}  # fmt: skip


def problem(
    rng: np.random.Generator, digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS), forget: Sequence[bool] = ()
) -> tuple[str, str, str]:
    """(prompt, worked answer, label) of one random problem with digits[0] to digits[1] digits an operand;
    `forget` as for `worked` (it does not change which problem is drawn)."""
    n = digits[0] + int((digits[1] - digits[0] + 1) * rng.random() ** 2)
    a, b = (rng.integers(0, 10, n) for _ in range(2))
    a[0], b[0] = rng.integers(1, 10), rng.integers(1, 10)
    prompt = "".join(map(str, a)) + "+" + "".join(map(str, b)) + "="
    return prompt, *worked(a.tolist(), b.tolist(), forget)


def worked(a: list[int], b: list[int], forget: Sequence[bool] = ()) -> tuple[str, str]:
    """The written-out column addition of digit lists `a` and `b` (most significant first), and the sum.
    Column i (from the right) with `forget[i]` true drops its carry in: written and added as 0, so the
    answer is consistent with itself and wrong (a flawed warm start for RL to fix)."""
    steps, digits, carry = [], [], 0
    for i, (x, y) in enumerate(zip(reversed(a), reversed(b), strict=True)):
        carry = 0 if i < len(forget) and forget[i] else carry
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        digits.append(total % 10)
        carry = total // 10
    label = str(carry) + "".join(map(str, reversed(digits)))
    return ";".join(steps) + ";#" + label, label


def write_task(work: Path, *, size: str = "small", train: int = 50_000, sft: int = 200_000, held_out: int = 512,
               seed: int = 0, digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS),
               carry_noise: float = 0.0) -> dict[str, Path]:  # fmt: skip
    """The model and the three datasets under `work` (see the module docstring); returns their paths.
    `carry_noise` q: each carry in of a worked answer in sft.jsonl is forgotten with probability q."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {"model": build_tiny_model(work / "model", SIZES[size])}
    noise = np.random.default_rng([seed, 4])  # apart from the problems' streams: the same problems at any q
    for name, count, stream in (("sft", sft, 1), ("prompts", train, 2), ("eval", held_out, 3)):
        rng = np.random.default_rng([seed, stream])
        with (work / f"{name}.jsonl").open("w") as f:
            for _ in range(count):
                forget = (noise.random(digits[1]) < carry_noise).tolist() if name == "sft" and carry_noise else []
                prompt, answer, label = problem(rng, digits, forget)
                row = {"prompt": prompt, "response": answer} if name == "sft" else {"prompt": prompt, "label": label}
                f.write(json.dumps(row) + "\n")
        paths[name] = work / f"{name}.jsonl"
    return paths


def digit_range(text: str) -> tuple[int, int]:
    """'LO-HI' as (LO, HI): the operands' digit counts, 1 <= LO <= HI."""
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
        raise argparse.ArgumentTypeError(f"--digits {text!r}: expected LO-HI with 1 <= LO <= HI, e.g. 1-12")
    return int(lo), int(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--sft", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", type=digit_range, default=(MIN_DIGITS, MAX_DIGITS), help="LO-HI")
    parser.add_argument("--carry-noise", type=float, default=0.0, help="worked answers forget a carry this often")
    args = parser.parse_args()
    paths = write_task(args.work, size=args.size, train=args.train, sft=args.sft, seed=args.seed, digits=args.digits,
                       carry_noise=args.carry_noise)  # fmt: skip
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
