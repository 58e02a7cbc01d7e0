"""The trainer consumer's loop: batches from the replay buffer, optimizer steps, weights out, acks last.

    ReplayBuffer.next_batch(version) ── waits for `share` fresh groups (new entries on the stream unblock it)
         │
         ▼
    TrainerBackend.train (a worker thread; the event loop keeps the held entries touched meanwhile)
         │
         ├─ every `publish_every` steps: version += 1, rank 0 hands the weights to the background publisher
         │  (weights/background.py: a device copy, then the next step starts while the version goes out)
         ├─ every `checkpoint_every` steps, at the end and on SIGTERM: a checkpoint that names the groups
         │  trained since the last commit (rank 0 runs its protocol, every rank writes its part: a sharded
         │  backend's shards); then every rank commits (SADD done + XACK) its own
         └─ without a checkpoint directory, groups are committed after every step

One trainer (all its data-parallel ranks) writes to a namespace at a time: it holds the trainer lease
(bus/lease.py) and its commits, version numbers and announcements apply only while it does. One that lost
the lease (frozen past its ttl while a standby took over) stops at once without committing, publishing or
checkpointing anything: the groups it trained since its last commit are trained again by the new holder.

A trainer killed between a step and its commit leaves those groups pending. On `--resume` it loads the
newest checkpoint, commits the groups that checkpoint names (their step is in the weights it loaded), and
re-reads its other pending entries: groups trained after the checkpoint are trained again, into the
restored weights, so each counts exactly once. On start it numbers its weights past any version already
announced, so producers never see a version go backwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from miles_stream.aio import stop_task
from miles_stream.buffer import Batch, ReplayBuffer
from miles_stream.bus import Claim
from miles_stream.bus.connection import data_loss_error, is_transient, lost_data
from miles_stream.bus.lease import Lease
from miles_stream.bus.run import WHAT_TO_DO, RunIdentity
from miles_stream.errors import ConfigError, DataLossError, LeaseLostError, RedisUnavailableError
from miles_stream.trainer.backend import TrainerBackend
from miles_stream.trainer.batch import collate
from miles_stream.trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint_ranks
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.metrics import MetricsSink
from miles_stream.weights.background import BackgroundPublisher
from miles_stream.weights.versions import WeightPublisher, WeightSubscriber

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class TrainProgress:
    step: int = 0
    version: int = 0
    groups: int = 0
    last: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # step, wait, publish_blocked -> summed over steps


class TrainerService:
    def __init__(
        self,
        config: TrainerConfig,
        *,
        trainer: TrainerBackend,
        buffer: ReplayBuffer,
        publisher: WeightPublisher | None,
        subscriber: WeightSubscriber | None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.config, self.trainer, self.buffer = config, trainer, buffer
        self.publisher, self.subscriber = publisher, subscriber
        if metrics is None:  # rank 0 writes the run's metrics
            metrics = (
                MetricsSink(config.metrics_path, config.tensorboard_dir) if trainer.parallel.is_main else MetricsSink()
            )
        self.metrics = metrics
        self.background = (
            BackgroundPublisher(publisher, on_host=config.publish_snapshot == "host") if publisher is not None else None
        )
        # Say the version or held count changed, and return once others can read it (Heartbeat.beat_now):
        # producers' admission reads them, and a new version must be visible before the commit that follows it
        self.on_change: Callable[[], Awaitable[None]] = _nothing
        self.lease: Lease | None = None  # the trainer lease (consumers/trainer.py takes it before reading)
        self.run_identity: RunIdentity | None = None  # the run joined (bus/run.py); checkpoints record it
        self.namespace = ""
        self.partitions = 1  # bus.partitions: a checkpoint's claims name partitions of this count (0: no streams)
        self.parallel = trainer.parallel
        self.progress = TrainProgress()
        self.waiting = ""  # "data" while waiting for a batch (heartbeats carry it to `status --watch`)
        self._uncommitted: list[Claim] = []
        self._seen = (0, 0.0, 0)  # buffer's (samples, reward sum, correct) at the previous step

    async def run(self, stop: asyncio.Event, *, resume: bool = False) -> TrainProgress:
        await self.buffer.start()
        await self._restore(resume)
        keep_alive = asyncio.create_task(self._keep_alive())
        outage, lost = False, None
        try:
            while not self._finished():
                self.waiting = "data"
                batch = await self.buffer.next_batch(self.progress.version, stop)
                self.waiting = ""
                if not self._all_ranks(batch is not None and not stop.is_set() and not self._lease_lost()):
                    break
                assert batch is not None
                await self._step(batch)
        except LeaseLostError as exc:
            lost = exc
        except RedisUnavailableError as exc:
            if not stop.is_set():
                raise
            outage = True  # told to stop while Redis was away (the retries gave up): leave what we can
            log.error("stopped_during_redis_outage", uncommitted_groups=len(self._uncommitted), error=str(exc),
                      checkpoint=bool(self.config.checkpoint_dir))  # fmt: skip
        finally:
            if not await stop_task(keep_alive):
                log.error("keep_alive_did_not_stop")
        if lost is not None or any(self.parallel.gather(self._lease_lost())):
            # another trainer holds the lease now: write nothing; what was not committed is trained again there
            log.error("lease_lost_stopping", uncommitted_groups=len(self._uncommitted), step=self.progress.step,
                      error=str(lost or (self.lease and self.lease.lost)))  # fmt: skip
            raise lost or LeaseLostError(str(self.lease.lost if self.lease else "the trainer lease was lost"))
        if self.background is not None and not outage:
            await self.background.flush()  # the last version out before the trainer says it is done
        if outage:  # no commit can reach Redis: the checkpoint names the groups, and --resume commits them
            await self._save()
        else:
            await self._save_and_commit()
        if self.config.export_dir:  # every rank: a sharded backend gathers; rank 0 writes
            await asyncio.to_thread(self.trainer.export_hf, Path(self.config.export_dir))
            if self.parallel.is_main:
                log.info("exported", path=self.config.export_dir)
        self.parallel.barrier()  # no rank tears down the process group while another still uses it
        return self.progress

    @property
    def held(self) -> int:
        """Groups trained but not yet committed (acked at the next checkpoint)."""
        return len(self._uncommitted)

    def _finished(self) -> bool:
        return 0 < self.config.max_steps <= self.progress.step

    def _lease_lost(self) -> bool:
        return self.lease is not None and self.lease.lost is not None

    def _all_ranks(self, go_on: bool) -> bool:
        return all(self.parallel.gather(go_on))

    async def _step(self, batch: Batch) -> None:
        groups = [r.group for r in batch.items]
        log.debug("batch_groups", step=self.progress.step + 1, group_ids=[g.group_id for g in groups])
        started = time.perf_counter()
        metrics = await asyncio.to_thread(self.trainer.train, collate(groups))
        p = self.progress
        p.step += 1
        p.groups += len(groups)
        self._uncommitted.extend(r.claim for r in batch.items)
        blocked = 0.0
        if p.step % self.config.publish_every == 0:
            blocked = self._offer(await self._next_version(p.version))
        await self.on_change()  # the new version first: a producer that sees the commit must also see it
        if not self.config.checkpoint_dir:
            await self._commit()
        elif p.step % self.config.checkpoint_every == 0:
            await self._save_and_commit()
        await self.on_change()
        rewards = [s.reward for g in groups for s in g.samples]
        lengths = [s.num_tokens for g in groups for s in g.samples]
        step_s = time.perf_counter() - started
        for phase, spent in (("step", step_s), ("wait", batch.wait_s), ("publish_blocked", blocked)):
            p.seconds[phase] = p.seconds.get(phase, 0.0) + spent
        c = self.buffer.counters
        samples, reward_sum, correct = (c.samples - self._seen[0], c.reward_sum - self._seen[1],
                                        c.correct - self._seen[2])  # fmt: skip
        self._seen = (c.samples, c.reward_sum, c.correct)
        p.last = metrics | {
            "version": p.version,
            "reward_mean": sum(rewards) / len(rewards),
            "rollout_reward": reward_sum / max(samples, 1),  # every group read since the last step, kept or not
            "rollout_accuracy": correct / max(samples, 1),
            "rollout_groups": c.received,
            "response_len_mean": sum(lengths) / len(lengths),
            "response_len_p90": sorted(lengths)[int(0.9 * (len(lengths) - 1))],
            "staleness_mean": sum(batch.staleness) / len(batch.staleness),
            "staleness_max": max(batch.staleness),
            "wait_s": batch.wait_s,
            "step_s": step_s,
            "time": time.time(),  # when the step ended (wall clock), for rates across processes
            "publish_blocked_s": blocked,
            **self._publish_metrics(),
            "tokens_per_s": metrics["tokens"] / max(metrics["train_s"], 1e-9),
            "stale_dropped": self.buffer.counters.stale_dropped,
            "rollout_tokens": c.response_tokens,  # response tokens of every group read so far
            "stale_tokens": c.stale_tokens,  # of those, in groups dropped or recycled as stale
            "filtered_tokens": c.filtered_tokens,  # and in groups a filter dropped
            "recycled": self.buffer.counters.recycled,
            "filtered": sum(self.buffer.counters.filtered.values()),
        }
        if self.parallel.is_main:
            self.metrics.write(p.step, p.last)

    def _offer(self, version: int) -> float:
        """A new version: snapshot it for the background publisher; returns the seconds that took."""
        self.progress.version = version
        state, dtype = self.trainer.weights()  # every rank: reading a sharded backend's tensors gathers them
        if self.background is None:
            for _ in state.values():  # the others' gathers need this rank's part; nothing is kept
                pass
            return 0.0
        return self.background.offer(version, state, dtype)

    async def _next_version(self, after: int) -> int:
        """The next weight version: rank 0 draws it from Redis (under the lease, never reused), every rank
        learns it. Without a publisher (a replay), the next integer."""
        version = after + 1
        if self.publisher is not None:
            version = await self.publisher.new_version(after)
        return int(self.parallel.gather(version)[0])

    def _publish_metrics(self) -> dict[str, float]:
        if self.background is None:
            return {}
        s = self.background.stats
        return {"publish_s": s.last_publish_s, "versions_published": s.published, "versions_skipped": s.skipped}

    async def _publish(self, version: int) -> None:
        """Publish `version` and wait until it is announced (at start, before any step)."""
        self._offer(version)
        if self.background is not None:
            await self.background.flush()

    async def _save_and_commit(self) -> None:
        """Checkpoint (when configured) what has been trained, then ack it. A no-op when nothing is new."""
        if await self._save():
            await self._commit()

    async def _save(self) -> bool:
        """Checkpoint (when configured) what has been trained and not committed; False when nothing is."""
        pending = any(self.parallel.gather(bool(self._uncommitted)))
        if not pending:
            return False
        if self.config.checkpoint_dir:
            claims = [c for rank_claims in self.parallel.gather(self._uncommitted) for c in rank_claims]
            recent = [
                g for rank_recent in self.parallel.gather(self.buffer.consumer.recent_commits()) for g in rank_recent
            ]
            if self.parallel.is_main and self.lease is not None:  # no checkpoint from a trainer that lost the lease
                await self._check_lease()
            state = TrainerState(step=self.progress.step, version=self.progress.version, claims=tuple(claims),
                                 run_id=self.run_identity.id if self.run_identity else "",
                                 recent=tuple(recent), partitions=self.partitions)  # fmt: skip
            # every rank writes its part (a sharded backend's shards); rank 0 runs the commit protocol around it
            path = await asyncio.to_thread(save_checkpoint_ranks, self.config.checkpoint_dir, state, self.trainer.save,
                                           self.parallel, keep=self.config.keep_checkpoints)  # fmt: skip
            if self.parallel.is_main:
                log.info("checkpoint_saved", path=str(path), step=state.step, version=state.version)
            self.parallel.barrier()
        return True

    async def _check_lease(self) -> None:
        """Raise LeaseLostError unless Redis says the lease is still ours; where Redis cannot be reached (the
        checkpoint taken in an outage), the last renewal's word: nobody can take it there either."""
        assert self.lease is not None
        try:
            await self.lease.fenced(lambda pipe: None)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self.lease.check()
            log.warning("lease_unverified_redis_unavailable", error=str(exc))

    async def _commit(self) -> None:
        ours = [c.group_id for c in self._uncommitted]
        await self.buffer.commit(self._uncommitted)
        self._uncommitted = []
        if self.parallel.world > 1:  # an entry whose commit Redis loses may come back to any rank: all remember
            self.buffer.consumer.remember([g for rank_ids in self.parallel.gather(ours) for g in rank_ids])

    async def _restore(self, resume: bool) -> None:
        state = None
        if resume and self.config.checkpoint_dir:
            state = load_checkpoint(self.config.checkpoint_dir, self.trainer.load)
        if state is not None:
            self._check_same_run(state)
            self.progress.step, self.progress.version = state.step, state.version
            same_run = self.run_identity is None or not state.run_id or state.run_id == self.run_identity.id
            if same_run:  # committed just before the checkpoint: a host crash may have taken the commits back
                self.buffer.consumer.remember([*state.recent, *(c.group_id for c in state.claims)])
            if self.parallel.is_main and same_run:
                await self.buffer.commit(list(state.claims))  # trained into the weights just loaded
            log.info("resumed", step=state.step, version=state.version,
                     committed=len(state.claims) if same_run else 0)  # fmt: skip
        elif resume:
            log.warning("resume_without_checkpoint", checkpoint_dir=self.config.checkpoint_dir)
        announced = None
        if self.subscriber is not None and self.parallel.is_main and (latest := await self.subscriber.latest()):
            announced = latest[1].version
        announced = self.parallel.gather(announced)[0]
        ours = self.progress.version
        if announced is None:
            if ours > 0:
                await self._publish(ours)  # Redis lost the announcements: producers need these weights
        elif not (state is not None and announced == ours):  # newer than anything producers may hold
            await self._publish(await self._next_version(max(announced, ours)))
        self.parallel.barrier()

    def _check_same_run(self, state: TrainerState) -> None:
        """A checkpoint continues only the run it was taken in, or one reset on purpose after a loss, and only with
        the partition count its claims were read with (with another they would be committed in the wrong keys)."""
        if state.partitions and self.partitions and state.partitions != self.partitions:
            raise ConfigError(f"bus.partitions: the checkpoint of step {state.step} in {self.config.checkpoint_dir} "
                              f"was taken with {state.partitions} partition(s); this trainer has {self.partitions}: "
                              f"resume with the run's count")  # fmt: skip
        run = self.run_identity
        if run is None or not state.run_id or state.run_id == run.id:
            return
        if run.reset_after_loss:
            log.warning("resumed_into_a_reset_run", checkpoint_run=state.run_id, run=run.id, step=state.step)
            return
        raise DataLossError(f"the checkpoint of step {state.step} in {self.config.checkpoint_dir} belongs to run "
                            f"{state.run_id}, and Redis now holds run {run.id}: it lost the run's data (or this is "
                            f"another run's namespace). Its streams and done set cannot be trusted to say what was "
                            f"trained. " + WHAT_TO_DO.format(ns=self.namespace))  # fmt: skip

    async def _keep_alive(self) -> None:
        """Keep the entries this trainer holds from being reclaimed while it trains on them."""
        source = self.buffer.consumer
        while True:
            await asyncio.sleep(source.keep_alive_interval_s)
            try:
                await source.keep_alive()
            except Exception as exc:
                if lost_data(exc):  # NOGROUP: Redis came back without this run's data
                    raise data_loss_error(exc) from exc
                if not is_transient(exc):
                    raise
                log.warning("keep_alive_failed", error=str(exc))  # a Redis blip: the next touch is in time


async def _nothing() -> None:
    return None
