"""The rollout producer: prompts in, scored `TrajectoryGroup`s out.

    {ns}:prompts ──XREADGROUP "producers"──► run(): one task per prompt, at most max_inflight_prompts
                                              │ tokenize → engine.generate(n samples) → score_group
                                              ▼
    {ns}:trajectories ◄── publish (backpressure) ── then XACK the prompt

A prompt is acknowledged only after its group is on the trajectory stream. A producer that dies leaves its
prompts pending, and another producer takes them over after `bus.claim_idle_ms`; the group id is derived from
the prompt's (epoch, index), so a prompt generated twice that way yields the same group id and is trained at
most once. On stop (SIGTERM) the producer takes no new prompt, aborts what it is generating, and hands those
prompts back at once (re-published and acked in one transaction) so another producer needs not wait.

Weights: before its first prompt the producer loads the newest announced version (so one attached mid-run
starts current), then applies each new one between decode steps; samples in flight continue under it and
their version spans say where. How a sample is rolled out is a `RolloutFn` (`turns.py`): single-turn by
default, or turns of model and tool output (the calculator example). Not here yet: aborting and recycling
partial rollouts through `{ns}:partials` on an update, and admission control by the staleness budget.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog

from miles_stream.bus import Entry, GroupPublisher, Keys, RetryPolicy, StreamConsumer
from miles_stream.bus.connection import is_transient
from miles_stream.bus.streams import DATA
from miles_stream.config import check
from miles_stream.errors import InvalidRequest, SchemaError, WeightIntegrityError
from miles_stream.prompts import PromptRecord, decode_prompt
from miles_stream.rewards import RewardError, RewardInput, score_group
from miles_stream.rollout.turns import RolloutFn, Trajectory, single_turn
from miles_stream.rollout.types import RolloutEngine, SamplingParams
from miles_stream.schema import Sample, TrajectoryGroup

if TYPE_CHECKING:
    from miles_stream.weights import WeightSubscriber

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutConfig:
    model: str = ""  # a local Hugging Face model directory
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_batch: int = 32
    n_samples_per_prompt: int = 4
    sampling: SamplingParams = field(default_factory=SamplingParams)
    turns: Literal["single", "calculator"] = "single"  # calculator: the multi-turn tool example (turns.py)
    max_turns: int = 4
    reward: str = "toy_addition"
    reward_timeout_s: float = 30.0
    max_inflight_prompts: int = 8
    producer_id: str = ""  # empty: host-pid
    seed: int = 0
    torch_threads: int = 0  # intra-op threads of the engine; 0 = torch's default (all cores). With several
    # processes on one machine, 1 each avoids oversubscription (docs/benchmarks.md, attaching producers)

    def __post_init__(self) -> None:
        check(self.torch_threads >= 0, "rollout.torch_threads", "must be >= 0 (0 = torch's default)")
        check(self.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt", "must be >= 1")
        check(self.max_inflight_prompts >= 1, "rollout.max_inflight_prompts", "must be >= 1")
        check(self.reward_timeout_s > 0, "rollout.reward_timeout_s", "must be positive")
        check(self.max_turns >= 1, "rollout.max_turns", "must be >= 1")

    def resolved_producer_id(self) -> str:
        return self.producer_id or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(slots=True)
class ProducerCounters:
    prompts: int = 0
    groups: int = 0
    returned: int = 0
    dead_lettered: int = 0
    tokens: int = 0


class RolloutProducer:
    def __init__(
        self,
        config: RolloutConfig,
        *,
        engine: RolloutEngine,
        tokenizer: Any,
        reward_fn: Any,
        prompts: StreamConsumer,
        publisher: GroupPublisher,
        rollout_fn: RolloutFn = single_turn,
        sampling: SamplingParams | None = None,
        weights: WeightSubscriber | None = None,
    ) -> None:
        self.weights = weights
        self.config, self.engine, self.tokenizer, self.reward_fn = config, engine, tokenizer, reward_fn
        self.rollout_fn, self.sampling = rollout_fn, sampling or config.sampling
        self.prompts, self.publisher = prompts, publisher
        self.producer_id = config.resolved_producer_id()
        self.counters = ProducerCounters()
        self.retry = RetryPolicy(attempts=0, max_delay_s=2.0)  # ride out a Redis restart
        self._stopping = False

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process prompts until `stop` is set, then hand back what is in flight. A prompt whose
        processing fails unexpectedly stops the producer and is raised here; that prompt stays pending."""
        await self.prompts.start()
        last_weights = await self._load_latest_weights()
        slots = asyncio.Semaphore(self.config.max_inflight_prompts)
        tasks: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            slots.release()
            if not t.cancelled() and (exc := t.exception()) is not None:
                failures.append(exc)
                stop.set()

        stop_wait = asyncio.create_task(stop.wait())
        keep_alive = asyncio.create_task(self._keep_alive())
        follow = asyncio.create_task(self._follow_weights(last_weights)) if self.weights else None
        try:
            while not stop.is_set():
                acquire = asyncio.create_task(slots.acquire())
                await asyncio.wait({acquire, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    acquire.cancel()
                    break
                reading = asyncio.create_task(self.retry.run(lambda: self.prompts.read(1)))
                await asyncio.wait({reading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():  # stopped mid-read: a read returns within block_ms, unless Redis is down
                    await asyncio.wait({reading}, timeout=self.prompts.config.block_ms / 1000 + 1.0)
                    if not reading.done():  # riding out an outage: give up, what is pending stays pending
                        reading.cancel()
                        slots.release()
                        break
                entries = reading.result()
                if stop.is_set():
                    for entry in entries:  # claimed just as we stopped: hand it straight back
                        await self._hand_back(entry)
                    slots.release()
                    break
                if not entries:
                    slots.release()
                    continue
                task = asyncio.create_task(self._process(entries[0]), name=entries[0].id)
                tasks.add(task)
                task.add_done_callback(done)
        finally:
            stop_wait.cancel()
            keep_alive.cancel()
            if follow is not None:
                follow.cancel()
            self._stopping = True
            if tasks:
                await self.engine.abort([t.get_name() for t in tasks])
                await asyncio.gather(*tasks, return_exceptions=True)
        if failures:
            raise failures[0]

    async def _load_latest_weights(self) -> str:
        """Before generating anything: load the newest published version, if any. Returns its entry id."""
        if self.weights is None or (latest := await self.weights.latest()) is None:
            return "0-0"
        entry_id, manifest = latest
        if manifest.version != self.engine.weight_version:
            await self.engine.update_weights(manifest.version, await self.weights.load(manifest))
            log.info("weights_loaded", version=manifest.version)
        return entry_id

    async def _follow_weights(self, last: str) -> None:
        """Apply each new version as it is announced; one that fails verification is skipped (old weights
        stay). Samples in flight go on under the new version, which their version spans record."""
        assert self.weights is not None
        while True:
            try:
                announced = await self.weights.next_after(last, block_ms=self.prompts.config.block_ms)
                if announced is None:
                    continue
                last, manifest = announced
                if manifest.version > self.engine.weight_version:
                    await self.engine.update_weights(manifest.version, await self.weights.load(manifest))
                    log.info("weights_updated", version=manifest.version)
            except WeightIntegrityError as exc:
                log.error("weights_rejected", error=str(exc))
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("weights_follow_retry", error=str(exc))
                await asyncio.sleep(1.0)

    async def _keep_alive(self) -> None:
        """Touch the prompts in flight every claim_idle/3, however long generation takes, so that no other
        producer takes them over; abort any taken over all the same (after a stall): its new owner makes it."""
        interval = self.prompts.config.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.prompts.touch_in_hand(force=True)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("keep_alive_failed", error=str(exc))
            if self.prompts.lost:
                await self.engine.abort(sorted(self.prompts.lost))

    async def _process(self, entry: Entry) -> None:
        try:
            prompt = decode_prompt(entry.data)
        except SchemaError as exc:
            self.counters.dead_lettered += 1
            await self.prompts.dead_letter(entry, f"schema: {exc}")
            return
        prompt_ids = self.tokenizer(prompt.text)["input_ids"]
        samples = [self.rollout_fn(self.engine, prompt_ids, self.sampling, entry.id)
                   for _ in range(self.config.n_samples_per_prompt)]  # fmt: skip
        try:
            results = await asyncio.gather(*samples)
        except InvalidRequest as exc:  # this prompt cannot run on this model: set it aside, keep going
            self.counters.dead_lettered += 1
            await self.prompts.dead_letter(entry, f"request: {exc}")
            return
        if entry.id in self.prompts.lost:  # taken over by another producer: it publishes this prompt
            self.prompts.lost.discard(entry.id)
            log.warning("prompt_taken_over", id=entry.id)
            return
        if self._stopping or any(r.finish_reason == "abort" for r in results):
            await self._hand_back(entry)
            return
        try:
            rewards = await score_group(self.reward_fn, self._reward_inputs(prompt, results),
                                        timeout_s=self.config.reward_timeout_s)  # fmt: skip
        except RewardError as exc:
            self.counters.dead_lettered += 1
            await self.prompts.dead_letter(entry, f"reward: {exc}")
            return
        group = TrajectoryGroup(
            group_id=f"e{prompt.epoch}-i{prompt.index}",
            prompt_key=prompt.key,
            producer_id=self.producer_id,
            prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
            samples=tuple(_sample(r, reward) for r, reward in zip(results, rewards, strict=True)),
            created_at=time.time(),
        )
        await self.publisher.publish(group)
        await self._ack_published(entry, group.group_id)
        self.counters.prompts += 1
        self.counters.groups += 1
        self.counters.tokens += sum(len(r.response_ids) for r in results)

    def _reward_inputs(self, prompt: PromptRecord, results: Sequence[Trajectory]) -> list[RewardInput]:
        texts = self.tokenizer.batch_decode([r.response_ids.tolist() for r in results], skip_special_tokens=True)
        return [
            RewardInput(prompt=prompt.text, response=text, label=prompt.label, finish_reason=r.finish_reason)
            for text, r in zip(texts, results, strict=True)
        ]

    async def _ack_published(self, entry: Entry, group_id: str) -> None:
        """Ack the prompt and keep its record under the group id, in one transaction: the trainer deletes
        it when done with the group, or re-queues it if the group arrives too stale to train on."""
        async with self.prompts.redis.pipeline(transaction=True) as pipe:
            pipe.hset(Keys(self.prompts.config.namespace).prompt_of, group_id, bytes(entry.data))
            pipe.xack(self.prompts.stream, self.prompts.group, entry.id)
            await pipe.execute()
        self.prompts.in_hand.discard(entry.id)

    async def _hand_back(self, entry: Entry) -> None:
        """Re-publish a prompt this producer will not finish and ack the original, in one transaction."""
        async with self.prompts.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.prompts.stream, {DATA: bytes(entry.data)})
            pipe.xack(self.prompts.stream, self.prompts.group, entry.id)
            await pipe.execute()
        self.prompts.in_hand.discard(entry.id)
        self.counters.returned += 1
        log.info("prompt_returned", id=entry.id)


def _sample(r: Trajectory, reward: float) -> Sample:
    return Sample(
        response_ids=r.response_ids,
        logprobs=r.logprobs,
        loss_mask=r.loss_mask,
        version_spans=r.version_spans,
        finish_reason=r.finish_reason,
        reward=reward,
        routing=r.routing,
    )
