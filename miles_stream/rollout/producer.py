"""The rollout producer: prompts in, scored `TrajectoryGroup`s out.

    {ns}:partials ─┐ (first: work already started)
    {ns}:prompts ──┴─XREADGROUP "producers"──► run(): one task per group, at most max_inflight_prompts;
                       ▲                       │  a new prompt only while the staleness budget allows
                       │                       │  tokenize → rollout_fn × n samples → score_group
                       │ aborted: recycle      ▼
                       └─── {ns}:partials ◄────┤
    {ns}:trajectories ◄── publish (backpressure) ── then XACK the prompt (or partial)

A prompt is acknowledged only after its group is on the trajectory stream, or its partial on the partials
stream (one transaction). A producer that dies leaves its entries pending, and another producer takes them
over after `bus.claim_idle_ms`; the group id is derived from the prompt's (epoch, index), so a prompt
generated twice that way yields the same group id and is trained at most once.

Weights: before its first prompt the producer loads the newest announced version (so one attached mid-run
starts current), then applies each new one between decode steps. What happens to samples in flight is
`rollout.on_update`: "continue" (they go on under the new version in the engine, their version spans say
where), or "recycle" (they are aborted, and their group goes to `{ns}:partials` with what it has; whoever
claims it resumes each sample under the new weights, spans again saying where: `partials.py`). On stop
(SIGTERM) the producer takes no new work and aborts what it is generating; groups with tokens go to the
partials stream, prompts with none back to the prompt stream, so nothing is lost and little is redone.

Admission (`admission.py`): a new prompt is claimed only while in_flight + queued fits the trainers'
staleness budget; partials are resumed regardless (they were admitted already). How a sample is rolled out
is a `RolloutFn` (`turns.py`): single-turn by default, or turns of model and tool output (the calculator).

Partitions (`bus.partitions` N > 1): the streams above exist once per partition, and the producer holds a `Lane`
for each. It reads every lane's partials, then every lane's prompts (without waiting, starting from the next lane
in turn; then a wait of `block_ms / N` on one), and a group stays in the lane its entry came from: published to
that lane's trajectory stream, recycled to its partials, handed back to its prompts, its prompt record kept there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from redis.exceptions import WatchError

from miles_stream.aio import stop_task
from miles_stream.bus import Entry, GroupPublisher, Keys, RetryPolicy, StreamConsumer
from miles_stream.bus.connection import is_transient, read_watched
from miles_stream.bus.done import is_done
from miles_stream.bus.keys import TRAINER_GROUP
from miles_stream.bus.streams import DATA
from miles_stream.codec import GroupCodec
from miles_stream.engines.base import RolloutEngine, SamplingParams
from miles_stream.errors import InvalidRequest, SchemaError
from miles_stream.prompts import PromptRecord, decode_prompt
from miles_stream.rewards import RewardError, RewardInput, score_group
from miles_stream.rollout.admission import Admission
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.partials import PROMPT, Partial, decode_partial, encode_partial, group_id
from miles_stream.rollout.turns import RolloutFn, Trajectory, single_turn
from miles_stream.rollout.weight_sync import WeightFollower
from miles_stream.schema import Sample, TrajectoryGroup

if TYPE_CHECKING:
    from miles_stream.weights.versions import WeightSubscriber

log = structlog.get_logger(__name__)
ABORT_REPEAT_S = 1.0  # on stop, the abort is sent again while a group task is still running (`_abort_in_flight`)


@dataclass(slots=True)
class ProducerCounters:
    prompts: int = 0
    groups: int = 0
    returned: int = 0  # prompts handed back untouched
    recycled: int = 0  # partial groups published to {ns}:partials
    dropped_done: int = 0  # entries handed back, or recycled, for a group the trainer had done: acked only
    resumed: int = 0  # partial groups claimed and continued
    dead_lettered: int = 0
    taken_over: int = 0  # groups dropped unpublished: another producer took their entry over (after a stall)
    tokens: int = 0
    weight_updates: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class Lane:
    """One partition of the run's streams as a producer sees it (`bus.partitions`; one lane, the namespace's own
    streams, by default): a group made from its prompt is published, recycled and handed back within it."""

    keys: Keys
    prompts: StreamConsumer
    publisher: GroupPublisher
    partials: StreamConsumer | None = None

    @property
    def sources(self) -> tuple[StreamConsumer, ...]:
        return (self.prompts,) if self.partials is None else (self.partials, self.prompts)


@dataclass(frozen=True, slots=True, eq=False)
class _Work:
    """One group to make: from a prompt entry (every sample fresh) or a partial entry (some started)."""

    lane: Lane
    source: StreamConsumer
    entry: Entry
    partial: Partial

    @property
    def request_id(self) -> str:
        return f"{self.source.stream}#{self.entry.id}"


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
        partials: StreamConsumer | None = None,
        admission: Admission | None = None,
        rollout_fn: RolloutFn = single_turn,
        sampling: SamplingParams | None = None,
        weights: WeightSubscriber | None = None,
        codec: GroupCodec | None = None,
        lanes: Sequence[Lane] = (),
    ) -> None:
        """`prompts`, `partials` and `publisher` are the one partition's; with `lanes` (`bus.partitions` > 1)
        those are the first lane's, and the producer reads every lane round-robin."""
        self.weights, self.admission = weights, admission
        self.config, self.engine, self.tokenizer, self.reward_fn = config, engine, tokenizer, reward_fn
        self.rollout_fn, self.sampling = rollout_fn, sampling or config.sampling
        self.lanes = tuple(lanes) or (Lane(Keys(prompts.config.namespace), prompts, publisher, partials),)
        self.prompts, self.partials, self.publisher = self.lanes[0].prompts, self.lanes[0].partials, publisher
        self._next_lane = 0  # the lane whose prompts are read first next time
        self.codec = codec or GroupCodec()
        self.producer_id = config.resolved_producer_id()
        self.counters = ProducerCounters()
        self.retry = RetryPolicy(attempts=0, max_delay_s=2.0)  # ride out a Redis restart
        self._stopping = False
        self._generating: set[str] = set()  # request ids of the groups in the engine now
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        """Groups this producer is making now (claimed, not yet published or recycled)."""
        return len(self._tasks)

    @property
    def sources(self) -> tuple[StreamConsumer, ...]:
        return tuple(s for lane in self.lanes for s in lane.sources)

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process prompts and partials until `stop` is set, then hand back or recycle what is in
        flight. A group whose processing fails unexpectedly stops the producer and is raised here; its entry
        stays pending."""
        self.retry = replace(self.retry, stop=stop)  # told to stop in an outage: hand back what it can, then go
        for source in self.sources:
            await source.start()
        follower = WeightFollower(self.engine, self.weights, recycle=self.config.on_update == "recycle",
                                  generating=lambda: self._generating, block_ms=self.prompts.config.block_ms,
                                  on_update=self._count_update) if self.weights else None  # fmt: skip
        last_weights = await follower.load_latest() if follower else "0-0"
        slots = asyncio.Semaphore(self.config.max_inflight_prompts)
        failures: list[BaseException] = []

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            slots.release()
            if not t.cancelled() and (exc := t.exception()) is not None:
                failures.append(exc)
                stop.set()

        stop_wait = asyncio.create_task(stop.wait())
        keep_alive = asyncio.create_task(self._keep_alive())
        follow = asyncio.create_task(follower.follow(last_weights)) if follower else None
        for background in (keep_alive, follow):  # one that fails (not a Redis blip) stops the producer loudly
            if background is not None:
                background.add_done_callback(lambda t: done_background(t, failures, stop))
        try:
            while not stop.is_set():
                acquire = asyncio.create_task(slots.acquire())
                await asyncio.wait({acquire, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    acquire.cancel()
                    break
                claimed = await self._claim(stop, stop_wait)
                if claimed is None or not claimed[2]:
                    slots.release()
                    if claimed is None:
                        break
                    continue
                lane, source, (entry,) = claimed
                task = asyncio.create_task(self._process(lane, source, entry))
                self._tasks.add(task)
                task.add_done_callback(done)
        finally:
            stop_wait.cancel()
            for background in (keep_alive, *([follow] if follow else [])):
                with contextlib.suppress(Exception):  # a failure was recorded by done_background
                    if not await stop_task(background):
                        log.error("background_task_did_not_stop", task=background.get_name())
            self._stopping = True
            await self._abort_in_flight()
        if failures:
            raise failures[0]

    async def _abort_in_flight(self) -> None:
        """Abort what is generating until every group task has ended (the tasks bound themselves: Redis writes
        give up on stop). The abort is repeated: a request still on its way to a server when the abort reached
        it is unknown there and ignored (vLLM: output_processor.py abort_requests pops what it holds), then runs
        to its end, or forever on a server that a cancelled weight update left paused (keep mode freezes it).
        Seen once in CI: a producer stopped mid-update waited out its grace on one such request."""
        while self._tasks:
            await self.engine.abort(sorted(self._generating))
            await asyncio.wait(set(self._tasks), timeout=ABORT_REPEAT_S)

    async def _claim(
        self, stop: asyncio.Event, stop_wait: asyncio.Task[Any]
    ) -> tuple[Lane, StreamConsumer, list[Entry]] | None:
        """Up to one entry: a partial if one waits (in any lane), else a prompt once admission allows: every
        lane's prompts without waiting, starting from the next lane in turn, then a wait of `block_ms` on one of
        them (the first of that turn). The wait is not divided among the lanes: an idle producer sends 2N + 1 reads
        a `block_ms` with N partitions, not N times that. None: stopped."""
        for lane in self.lanes:
            if lane.partials is not None:
                entries = await self._read(lane, lane.partials, stop_wait, block_ms=0)
                if entries is None or entries:
                    return None if entries is None else (lane, lane.partials, entries)
        if self.admission is not None and not await self.admission.wait_for_room(lambda: self.in_flight, stop):
            return None
        n = len(self.lanes)
        first, self._next_lane = self._next_lane, (self._next_lane + 1) % n
        order = [self.lanes[(first + i) % n] for i in range(n)]
        if n > 1:
            for lane in order:
                entries = await self._read(lane, lane.prompts, stop_wait, block_ms=0)
                if entries is None or entries:
                    return None if entries is None else (lane, lane.prompts, entries)
        entries = await self._read(order[0], order[0].prompts, stop_wait, block_ms=self.prompts.config.block_ms)
        return None if entries is None else (order[0], order[0].prompts, entries)

    async def _read(
        self, lane: Lane, source: StreamConsumer, stop_wait: asyncio.Task[Any], block_ms: int | None = None
    ) -> list[Entry] | None:
        """One read that a stop cuts short. None: stopped (entries read just then are handed back)."""
        reading = asyncio.create_task(self.retry.run(lambda: source.read(1, block_ms)))
        await asyncio.wait({reading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not reading.done():  # stopped mid-read: a read returns within block_ms, unless Redis is down
            await asyncio.wait({reading}, timeout=source.config.block_ms / 1000 + 1.0)
            if not reading.done():  # riding out an outage: give up, what is pending stays pending
                reading.cancel()
                return None
        entries = reading.result()
        if stop_wait.done():
            for entry in entries:  # claimed just as we stopped: hand it straight back
                await self._hand_back(lane, source, entry, dict(entry.fields))
            return None
        return entries

    def _count_update(self) -> None:
        self.counters.weight_updates += 1

    async def _keep_alive(self) -> None:
        """Touch the entries in flight every claim_idle/3, however long generation takes, so that no other
        producer takes them over; abort any taken over all the same (after a stall): its new owner makes it."""
        interval = self.prompts.config.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            for source in self.sources:
                try:
                    await source.touch_in_hand(force=True)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("keep_alive_failed", error=str(exc))
                if source.lost:
                    await self.engine.abort(sorted(f"{source.stream}#{i}" for i in source.lost))

    def _work(self, lane: Lane, source: StreamConsumer, entry: Entry) -> _Work:
        """Raises `SchemaError` for an entry that does not decode."""
        if source is lane.partials:
            self.counters.resumed += 1
            return _Work(lane, source, entry, decode_partial(self.codec, entry.fields))
        prompt = decode_prompt(entry.data)
        return _Work(lane, source, entry, Partial(bytes(entry.data), prompt, (), self.config.n_samples_per_prompt))

    async def _process(self, lane: Lane, source: StreamConsumer, entry: Entry) -> None:
        try:
            work = self._work(lane, source, entry)
        except SchemaError as exc:
            self.counters.dead_lettered += 1
            await source.dead_letter(entry, f"schema: {exc}")
            return
        if self._stopping:  # started after the stop's abort: nothing generated, hand it straight back
            await self._hand_back(lane, source, entry, dict(entry.fields))
            return
        prompt = work.partial.prompt
        prompt_ids = self.tokenizer(prompt.text)["input_ids"]
        self._generating.add(work.request_id)
        try:
            results = await self._rollout(prompt_ids, work.request_id, work.partial.prefixes)
        except InvalidRequest as exc:  # this prompt cannot run on this model: set it aside, keep going
            self.counters.dead_lettered += 1
            await source.dead_letter(entry, f"request: {exc}")
            return
        finally:
            self._generating.discard(work.request_id)
        if entry.id in source.lost:  # taken over by another producer: it publishes this group
            source.lost.discard(entry.id)
            self.counters.taken_over += 1
            log.warning("entry_taken_over", stream=source.stream, id=entry.id)
            return
        if self._stopping or any(r.finish_reason == "abort" for r in results):
            await self._recycle(work, prompt_ids, results)
            return
        try:
            rewards = await score_group(self.reward_fn, self._reward_inputs(prompt, results),
                                        timeout_s=self.config.reward_timeout_s)  # fmt: skip
        except RewardError as exc:
            self.counters.dead_lettered += 1
            await source.dead_letter(entry, f"reward: {exc}")
            return
        group = TrajectoryGroup(
            group_id=group_id(prompt),
            prompt_key=prompt.key,
            producer_id=self.producer_id,
            prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
            samples=tuple(_scored(r, reward) for r, reward in zip(results, rewards, strict=True)),
            created_at=time.time(),
        )
        await self._keep_prompt(work, group.group_id)  # left if dropped below: its new owner writes the same
        # Ownership is checked again at the XADD: a stall during scoring or the wait for room may outlast the
        # claim, and the check above (after generation) came before it.
        if await lane.publisher.publish(group, still_owned=lambda: source.confirm_owned(entry.id)) is None:
            self.counters.taken_over += 1
            log.warning("group_dropped_taken_over", stream=source.stream, id=entry.id, group=group.group_id)
            return
        await self._ack_published(work)
        if self.admission is not None:
            self.admission.note_queued()
        self.counters.prompts += 1
        self.counters.groups += 1
        self.counters.tokens += sum(len(r.response_ids) for r in results)

    async def _rollout(
        self, prompt_ids: Sequence[int], request_id: str, prefixes: Sequence[Trajectory | None]
    ) -> list[Trajectory]:
        """The group's samples: in one engine call where the rollout function can (`SingleTurn.group`)."""
        group = getattr(self.rollout_fn, "group", None)
        if group is not None:
            return list(await group(self.engine, prompt_ids, self.sampling, request_id, prefixes))
        return list(await asyncio.gather(*(self._sample(prompt_ids, request_id, p) for p in prefixes)))

    async def _sample(self, prompt_ids: Sequence[int], request_id: str, prefix: Trajectory | None) -> Trajectory:
        if prefix is not None and prefix.finish_reason != "abort":
            return prefix  # finished before the group was recycled
        return await self.rollout_fn(self.engine, prompt_ids, self.sampling, request_id, prefix)

    def _reward_inputs(self, prompt: PromptRecord, results: Sequence[Trajectory]) -> list[RewardInput]:
        texts = self.tokenizer.batch_decode([r.response_ids.tolist() for r in results], skip_special_tokens=True)
        return [
            RewardInput(prompt=prompt.text, response=text, label=prompt.label, finish_reason=r.finish_reason)
            for text, r in zip(texts, results, strict=True)
        ]

    async def _keep_prompt(self, work: _Work, group_id: str) -> None:
        """Keep the prompt record under the group id before the group is visible: the trainer deletes it when
        done with the group (or with a duplicate of it), or re-queues it if the group arrives too stale to train
        on. Written after the publication, a trainer that committed the group first left it behind for good."""
        source = work.source
        prompt_of = work.lane.keys.prompt_of
        await self.retry.run(lambda: source.redis.hset(prompt_of, group_id, work.partial.prompt_data))

    async def _ack_published(self, work: _Work) -> None:
        source = work.source
        await self.retry.run(lambda: source.redis.xack(source.stream, source.group, work.entry.id))  # idempotent
        source.in_hand.discard(work.entry.id)

    async def _recycle(self, work: _Work, prompt_ids: Sequence[int], results: Sequence[Trajectory]) -> None:
        """An interrupted group: what it has goes to the partials stream (the prompt back to the prompt
        stream if no sample has a token yet, or where there is no partials stream)."""
        fields = None
        lane = work.lane
        if lane.partials is not None:
            try:
                fields = encode_partial(self.codec, work.partial.prompt_data, work.partial.prompt, prompt_ids,
                                        results, self.producer_id)  # fmt: skip
            except SchemaError as exc:  # should not happen; the prompt is kept all the same
                log.error("partial_not_encodable", group=group_id(work.partial.prompt), error=str(exc))
        if fields is None:
            await self._hand_back(lane, work.source, work.entry, {DATA: work.partial.prompt_data}, to=lane.prompts)
            return
        assert lane.partials is not None
        if not await self._hand_back(lane, work.source, work.entry, fields, to=lane.partials, count=False):
            return
        self.counters.recycled += 1
        if self.admission is not None:
            self.admission.note_queued()

    async def _hand_back(
        self,
        lane: Lane,
        source: StreamConsumer,
        entry: Entry,
        fields: dict[Any, Any],
        to: StreamConsumer | None = None,
        count: bool = True,
    ) -> bool:
        """Publish `fields` on `to` (default: the entry's own stream) and ack the entry, in one transaction;
        only ack it if the trainer is done with its group already (a copy published by another producer): a
        new entry for a done group would outlive the done set's record of it (`bus/done.py`)."""
        target = to or source
        group = _group_of(fields)
        done_key = lane.keys.done(TRAINER_GROUP)  # the lane's: in its slot, with both streams

        async def hand_back() -> bool:  # retried through an outage; a retry after an applied EXEC re-publishes,
            while True:  # and the copy's group id is dropped
                async with source.redis.pipeline(transaction=True) as pipe:
                    await read_watched(pipe.watch(done_key))
                    done = group is not None and await is_done(pipe, done_key, group)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if not done:
                        pipe.xadd(target.stream, fields)
                    pipe.xack(source.stream, source.group, entry.id)
                    try:
                        await pipe.execute()
                    except WatchError:  # a commit meanwhile: look again
                        continue
                    return not done

        returned = await self.retry.run(hand_back)
        source.in_hand.discard(entry.id)
        if not returned:
            self.counters.dropped_done += 1
            log.info("entry_dropped_group_done", stream=source.stream, id=entry.id, group=group)
            return False
        self.counters.returned += count
        log.info("entry_returned", stream=target.stream, id=entry.id)
        return True


def _group_of(fields: Mapping[Any, Any]) -> str | None:
    """The group id a prompt entry or a partial makes (None if its prompt record does not decode: it is handed
    back as it is, and dead-lettered by whoever claims it)."""
    data = fields.get(PROMPT, fields.get(DATA))
    try:
        return group_id(decode_prompt(data)) if data is not None else None
    except SchemaError:
        return None


def done_background(task: asyncio.Task[None], failures: list[BaseException], stop: asyncio.Event) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background_task_failed", task=task.get_name(), error=repr(exc))
        failures.append(exc)
        stop.set()


def _scored(r: Trajectory, reward: float) -> Sample:
    return Sample(
        response_ids=r.response_ids,
        logprobs=r.logprobs,
        loss_mask=r.loss_mask,
        version_spans=r.version_spans,
        finish_reason=r.finish_reason,
        routing=r.routing,
        reward=reward,
    )
