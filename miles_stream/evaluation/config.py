"""`EvalConfig`: the evaluator's settings, the `eval` section of the run config (no torch here).

The evaluator's engine is the `rollout` section's (engine, model, device, batch, dtype): give the eval process
its own overrides on its command line (`rollout.device=cuda:1`, `rollout.sglang.urls=[...]` for servers of its
own). What it samples and how it scores are here.
"""

from __future__ import annotations

from dataclasses import dataclass

from miles_stream.config import check


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    path: str = ""  # the held-out dataset: a .jsonl or .parquet file of prompt and label records
    prompt_key: str = "prompt"
    label_key: str = "label"
    limit: int = 0  # evaluate the first `limit` rows only; 0 = all
    every: int = 1  # evaluate versions divisible by this (every k-th); when behind, the newest such version
    n_samples: int = 4  # sampled responses per prompt (for pass@k, mean reward, length); 0 = greedy only
    pass_k: tuple[int, ...] = ()  # the k of pass@k, each <= n_samples; empty: (n_samples,) when n_samples > 1
    temperature: float = 1.0  # of the n samples (pass@1 is always greedy)
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0: rollout.sampling.max_new_tokens
    reward: str = ""  # a reward function's name (rewards/); empty: rollout.reward, the task's own
    correct_at: float = 1.0  # a response counts as correct when its reward is at least this
    initial: bool = True  # with no version published yet, evaluate the weights the engine starts with (v0)
    out: str = "eval.jsonl"  # one JSON object per version evaluated; empty: none
    tensorboard_dir: str = ""  # when set and tensorboard is installed
    evaluator_id: str = ""  # empty: evaluator-{host}-{pid}
    stream_maxlen: int = 10000  # results kept on {ns}:eval (approximate trim)

    def __post_init__(self) -> None:
        check(self.limit >= 0, "eval.limit", "must be >= 0 (0 = every row)")
        check(self.every >= 1, "eval.every", "must be >= 1 (1 = every version)")
        check(self.n_samples >= 0, "eval.n_samples", "must be >= 0 (0 = greedy only)")
        check(all(1 <= k <= self.n_samples for k in self.pass_k), "eval.pass_k",
              f"each k must be within 1..eval.n_samples ({self.n_samples})")  # fmt: skip
        check(self.temperature > 0, "eval.temperature", "must be > 0 (pass@1 is greedy already)")
        check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        check(self.max_new_tokens >= 0, "eval.max_new_tokens", "must be >= 0 (0 = rollout.sampling's)")
        check(self.stream_maxlen >= 1, "eval.stream_maxlen", "must be >= 1")

    @property
    def ks(self) -> tuple[int, ...]:
        if self.pass_k:
            return tuple(sorted(set(self.pass_k)))
        return (self.n_samples,) if self.n_samples > 1 else ()
