"""The evaluator: each chosen weight version scored on a held-out set, while training goes on.

    {ns}:weights ──XREAD (no group; after the last entry seen)──► choose: the newest announced version that is
         │                                                       divisible by eval.every and newer than the
         │                                                       last evaluated (behind: the rest are skipped)
         ▼
    own engine (rollout/engines.py registry) ◄── load that version (checksums verified)
         │  per prompt: 1 greedy response (pass@1) + n sampled (pass@k, reward, length, truncation)
         ▼
    EvalResult ──► eval.jsonl, TensorBoard, XADD {ns}:eval (status and the trainer read it), /metrics

It waits on nothing but announcements and its own engine. It is no consumer group on any stream the trainer or
producers use, so backpressure never counts it, and it holds no weight version back from pruning (its
heartbeat reports `eval_version`, not `weight_version`). A chosen version pruned before it could be read (the
trainer keeps only the newest and those live producers use) is replaced by the newest announced one, which is
always kept: with `eval.every` > 1 and no producer on that version, the result may be for a version that is not
a multiple of k; it says which. With `eval.initial`, the weights the engine starts with are scored as
version 0 when nothing is published yet. Stop (SIGTERM) is checked between batches of prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from miles_stream.bus import Keys, RetryPolicy
from miles_stream.bus.connection import is_transient
from miles_stream.engines.base import GenerationRequest, GenerationResult, RolloutEngine, SamplingParams
from miles_stream.errors import WeightIntegrityError
from miles_stream.evaluation.config import EvalConfig
from miles_stream.evaluation.passk import mean_pass_at_k
from miles_stream.evaluation.record import FIELD, EvalResult, encode_result
from miles_stream.feeder import Row
from miles_stream.rewards import RewardInput, score_group
from miles_stream.rollout.weight_sync import WeightFollower
from miles_stream.weights.manifest import WeightManifest
from miles_stream.weights.versions import WeightSubscriber

log = structlog.get_logger(__name__)
Sink = Callable[[EvalResult], None]


class Stopped(Exception):
    """Told to stop in the middle of an evaluation: its result is dropped."""


@dataclass(slots=True)
class EvalCounters:
    evaluated: int = 0
    skipped: int = 0  # announced versions not evaluated (every-k, or behind)
    rejected: int = 0  # versions that failed to load (pruned meanwhile, or checksums)
    waiting: str = "weights"  # what it waits on now: "weights" (a new version), "" (evaluating)
    last: EvalResult | None = None
    rate_per_min: float = 0.0  # evaluations a minute, over the last one
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class _Scored:
    correct: int  # sampled responses that are correct
    greedy_correct: bool
    rewards: list[float]
    greedy_reward: float
    lengths: list[int]
    truncated: int


class Evaluator:
    def __init__(
        self,
        config: EvalConfig,
        *,
        engine: RolloutEngine,
        tokenizer: Any,
        reward_fn: Any,
        rows: Sequence[Row],
        sampling: SamplingParams,
        weights: WeightSubscriber,
        redis: Any,
        keys: Keys,
        evaluator_id: str,
        max_batch: int,
        reward_timeout_s: float = 30.0,
        block_ms: int = 1000,
        sinks: Sequence[Sink] = (),
    ) -> None:
        """`sampling`: the rollout's (stop tokens, max_new_tokens); eval's own temperature and top_p apply."""
        self.config, self.engine, self.tokenizer, self.reward_fn = config, engine, tokenizer, reward_fn
        self.rows, self.weights, self.redis, self.keys = rows, weights, redis, keys
        self.evaluator_id, self.block_ms, self.sinks = evaluator_id, block_ms, sinks
        self.reward_timeout_s = reward_timeout_s
        budget = config.max_new_tokens or sampling.max_new_tokens
        self.greedy = replace(sampling, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=budget)
        self.sampled = replace(sampling, temperature=config.temperature, top_p=config.top_p, max_new_tokens=budget)
        self.prompt_ids = [tokenizer(r.text)["input_ids"] for r in rows]
        self.per_call = max(1, max_batch // (1 + config.n_samples))  # prompts per engine call
        self.follower = WeightFollower(engine, weights, recycle=False, generating=set, block_ms=block_ms)
        self.counters = EvalCounters()
        self.retry = RetryPolicy(attempts=0, max_delay_s=2.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate the chosen versions until `stop` is set."""
        self.retry = replace(self.retry, stop=stop)
        last_id, newest = "0-0", None
        latest = await self.retry.run(self.weights.latest)
        if latest is not None:
            last_id, newest = latest[0], latest[1]
        if newest is not None and newest.version % self.config.every == 0:
            await self._load_and_evaluate(newest, stop, skipped=0)
        elif newest is None and self.config.initial:
            await self._evaluate_and_announce(self.engine.weight_version, stop, skipped=0)
        skipped = 0
        while not stop.is_set():
            self.counters.waiting = "weights"
            announced = await self._next(last_id, stop)
            if announced is None:
                continue
            last_id, manifests = announced
            done = self.counters.last.version if self.counters.last is not None else -1
            fresh = [m for m in manifests if m.version > done]
            chosen = [m for m in fresh if m.version % self.config.every == 0]
            if not chosen:
                skipped += len(fresh)
                continue
            skipped += len(fresh) - 1
            evaluated = await self._load_and_evaluate(chosen[-1], stop, skipped)
            if not evaluated and not stop.is_set() and fresh[-1] is not chosen[-1]:
                # pruned before it could be read (no live producer used it): the newest announced is kept
                evaluated = await self._load_and_evaluate(fresh[-1], stop, skipped)
            if evaluated:
                skipped = 0

    async def _next(self, last_id: str, stop: asyncio.Event) -> tuple[str, list[WeightManifest]] | None:
        try:
            return await self.weights.announced_after(last_id, block_ms=self.block_ms)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("eval_weights_read_retry", error=str(exc))
            await _wait(stop, 1.0)
            return None

    async def _load_and_evaluate(self, manifest: WeightManifest, stop: asyncio.Event, skipped: int) -> bool:
        """Whether the version was evaluated (False: it failed to load, or the evaluator was told to stop)."""
        self.counters.waiting = ""
        try:
            await self.follower.update(manifest)
        except WeightIntegrityError as exc:  # pruned while read, or corrupt: the next announcement comes
            self.counters.rejected += 1
            log.warning("eval_weights_rejected", version=manifest.version, error=str(exc))
            return False
        return await self._evaluate_and_announce(manifest.version, stop, skipped)

    async def _evaluate_and_announce(self, version: int, stop: asyncio.Event, skipped: int) -> bool:
        self.counters.waiting = ""
        try:
            result = await self.evaluate(version, stop, skipped=skipped)
        except Stopped:
            return False
        await self.retry.run(lambda: self.redis.xadd(self.keys.eval, {FIELD: encode_result(result)},
                                                     maxlen=self.config.stream_maxlen, approximate=True))  # fmt: skip
        for sink in self.sinks:
            sink(result)
        c = self.counters
        previous, c.last, c.evaluated = c.last, result, c.evaluated + 1
        if previous is not None:
            c.rate_per_min = 60.0 / max(result.created_at - previous.created_at, 1e-6)
        c.skipped += skipped
        log.info("eval_result", version=result.version, pass_at_1=round(result.pass_at_1, 4),
                 pass_at_k={k: round(v, 4) for k, v in result.pass_at_k.items()},
                 reward_mean=round(result.reward_mean, 4), response_tokens=round(result.response_tokens_mean, 2),
                 truncated=round(result.truncated_rate, 4), eval_s=result.eval_s, skipped=skipped)  # fmt: skip
        return True

    async def evaluate(self, version: int, stop: asyncio.Event | None = None, *, skipped: int = 0) -> EvalResult:
        """Score the engine's current weights (`version`) on every held-out prompt. Raises `Stopped` if `stop`
        is set between two engine calls."""
        started = time.perf_counter()
        scored: list[_Scored] = []
        for at in range(0, len(self.rows), self.per_call):
            if stop is not None and stop.is_set():
                raise Stopped
            span = range(at, min(at + self.per_call, len(self.rows)))
            results = await self.engine.generate([r for i in span for r in self._requests(version, i)])
            per = 1 + self.config.n_samples
            for j, i in enumerate(span):
                scored.append(await self._score(self.rows[i], results[j * per : (j + 1) * per]))
        return self._summarise(version, scored, time.perf_counter() - started, skipped)

    def _requests(self, version: int, i: int) -> list[GenerationRequest]:
        ids = self.prompt_ids[i]
        greedy = GenerationRequest(request_id=f"eval-{version}-{i}-g", prompt_ids=ids, params=self.greedy)
        return [greedy, *(GenerationRequest(request_id=f"eval-{version}-{i}-{s}", prompt_ids=ids, params=self.sampled)
                          for s in range(self.config.n_samples))]  # fmt: skip

    async def _score(self, row: Row, results: Sequence[GenerationResult]) -> _Scored:
        texts = self.tokenizer.batch_decode([r.response_ids.tolist() for r in results], skip_special_tokens=True)
        inputs = [RewardInput(prompt=row.text, response=t, label=row.label, finish_reason=r.finish_reason)
                  for t, r in zip(texts, results, strict=True)]  # fmt: skip
        greedy = (await score_group(self.reward_fn, inputs[:1], timeout_s=self.reward_timeout_s))[0]
        sampled = inputs[1:] or inputs[:1]
        population = results[1:] or results[:1]
        rewards = [greedy] if not inputs[1:] else await score_group(self.reward_fn, sampled,
                                                                     timeout_s=self.reward_timeout_s)  # fmt: skip
        at = self.config.correct_at
        return _Scored(correct=sum(r >= at for r in rewards) if inputs[1:] else 0, greedy_correct=greedy >= at,
                       rewards=rewards, greedy_reward=greedy, lengths=[len(r.response_ids) for r in population],
                       truncated=sum(r.finish_reason == "length" for r in population))  # fmt: skip

    def _summarise(self, version: int, scored: list[_Scored], seconds: float, skipped: int) -> EvalResult:
        n = self.config.n_samples
        responses = sum(len(s.lengths) for s in scored)
        return EvalResult(
            version=version,
            evaluator_id=self.evaluator_id,
            dataset=self.config.path,
            prompts=len(scored),
            n_samples=n,
            pass_at_1=sum(s.greedy_correct for s in scored) / len(scored),
            pass_at_k={k: mean_pass_at_k([s.correct for s in scored], n, k) for k in self.config.ks},
            reward_mean=sum(sum(s.rewards) for s in scored) / responses,
            greedy_reward_mean=sum(s.greedy_reward for s in scored) / len(scored),
            response_tokens_mean=sum(sum(s.lengths) for s in scored) / responses,
            truncated_rate=sum(s.truncated for s in scored) / responses,
            eval_s=round(seconds, 4),
            skipped=skipped,
            created_at=time.time(),
        )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
