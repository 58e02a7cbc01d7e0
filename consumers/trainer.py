"""`miles-stream train`: a trainer consumer. Batches from the trajectory stream in, versioned weights out.

Data parallel: run it under torchrun (`torchrun --nproc-per-node 2 -m miles_stream.cli train ...`); each
rank reads `buffer.rollout_batch_size / world` groups per step as consumer `trainer-{rank}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import structlog

from miles_stream import aio
from miles_stream.buffer import ReplayBuffer
from miles_stream.bus import (
    GroupConsumer,
    Heartbeat,
    Keys,
    RetryPolicy,
    StreamClient,
    StreamConsumer,
    connect,
    open_stream_client,
    wait_until_reachable,
)
from miles_stream.bus.keys import partition_keys, partitions_share
from miles_stream.bus.lease import Lease, PartitionFence
from miles_stream.bus.partitioned import PartitionedConsumer, close_partition_clients, partition_clients
from miles_stream.bus.run import check_partitions, join_run, verify_run
from miles_stream.codec import GroupCodec
from miles_stream.config import check_model_dir, to_dict
from miles_stream.errors import ConfigError, LeaseHeldError, LeaseLostError, MilesStreamError
from miles_stream.evaluation.follow import RunFollower
from miles_stream.metrics_http import Collect, MetricsServer
from miles_stream.record import RecordingSource
from miles_stream.run_config import RunConfig
from miles_stream.schema import DEFAULT_LIMITS
from miles_stream.status import exporter
from miles_stream.status.snapshot import StreamStatus, stream_status
from miles_stream.trainer.backend import TrainerBackend
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.service import TrainerService
from miles_stream.wandb_log import WandbRun
from miles_stream.weights.transports import FileTransport, RedisTransport, WeightTransport
from miles_stream.weights.versions import WeightPublisher, WeightSubscriber

log = structlog.get_logger("consumers.trainer")


def main(config: RunConfig, *, resume: bool = False, replay: Sequence[str] = ()) -> int:
    cfg = config.trainer
    check_model_dir(cfg.model, "trainer.model")
    if config.algo.use_opd:
        check_model_dir(cfg.teacher_model, "trainer.teacher_model")
    parallel = DataParallel.from_env(cfg.device)
    if config.buffer.rollout_batch_size % parallel.world:
        raise ConfigError(f"buffer.rollout_batch_size={config.buffer.rollout_batch_size} must divide evenly "
                          f"among {parallel.world} data-parallel ranks")  # fmt: skip
    if replay and parallel.world > 1:
        raise ConfigError("--replay trains on one rank: every rank would read the whole recording")
    try:
        if replay:
            return aio.run_process(lambda stop: _run_replay(config, replay, resume, stop), what="the trainer",
                                   grace_s=cfg.stop_grace_s)  # fmt: skip
        return aio.run_process(lambda stop: _run(config, parallel, resume, stop), what="the trainer",
                               grace_s=cfg.stop_grace_s)  # fmt: skip
    finally:
        parallel.close()


async def _run_replay(config: RunConfig, files: Sequence[str], resume: bool, stop: asyncio.Event) -> int:
    """Train on a recording: the same groups in the same order every run, nothing published."""
    trainer = await asyncio.to_thread(_backend, config, DataParallel())  # off the loop: signals stay handled
    try:
        source = RecordingSource(files, _codec(config, trainer))
    except FileNotFoundError as exc:
        raise ConfigError(f"--replay: {exc}") from exc
    buffer = ReplayBuffer(source, config.buffer)
    service = TrainerService(config.trainer, trainer=trainer, buffer=buffer, publisher=None, subscriber=None)
    service.partitions = 0  # no streams: a checkpoint of any partition count resumes (its claims go nowhere)
    try:
        await service.run(stop, resume=resume)
    finally:
        service.metrics.close()
    _log_stopped(service, buffer)
    return 0


async def _run(config: RunConfig, parallel: DataParallel, resume: bool, stop: asyncio.Event) -> int:
    cfg, keys = config.trainer, Keys(config.bus.namespace)
    trainer = await asyncio.to_thread(_backend, config, parallel)  # off the loop: signals stay handled
    name = cfg.trainer_id or f"trainer-{parallel.rank}"
    redis, blocking = connect(config.redis), open_stream_client(config.redis, block_ms=config.bus.block_ms)
    try:
        await wait_until_reachable(redis, config.redis, stop)
        await check_partitions(redis, keys, config.bus.partitions)
    except BaseException:
        await blocking.aclose()
        await redis.aclose()
        raise
    retry = RetryPolicy(attempts=0, max_delay_s=2.0, stop=stop)  # ride out a Redis restart, unless told to stop
    parts = partition_keys(keys.namespace, config.bus.partitions)
    clients = partition_clients(config.redis, parts, redis)
    groups = [GroupConsumer(StreamConsumer(client, blocking, stream=k.trajectories, group="trainer", consumer=name,
                                           dead_stream=k.dead, config=config.bus),
                            k, _codec(config, trainer), owns_prompts=True, retry=retry, partition=p)
              for p, (client, k) in enumerate(zip(clients, parts, strict=True))]  # fmt: skip
    consumer: GroupConsumer | PartitionedConsumer = groups[0]
    if len(groups) > 1:  # this rank reads its share of the partitions, commits into any
        consumer = PartitionedConsumer(groups, partitions_share(len(groups), parallel.rank, parallel.world))
    buffer = ReplayBuffer(consumer, config.buffer, share=config.buffer.rollout_batch_size // parallel.world)
    chunks = open_stream_client(config.redis)  # the redis transport's weight chunks, off the event loop
    transport = _transport(config, redis, keys, chunks)
    publisher = WeightPublisher(redis, keys, transport, config.bus.heartbeat_ttl_s, retry) if parallel.is_main else None
    subscriber = WeightSubscriber(redis, keys, {transport.name: transport})
    service = TrainerService(cfg, trainer=trainer, buffer=buffer, publisher=publisher, subscriber=subscriber)
    progress = service.progress
    follower: asyncio.Task[None] | None = None
    try:
        service.lease = await _take_lease(config, parallel, redis, keys, name, stop, retry, clients, parts)
        for group, client, k in zip(groups, clients, parts, strict=True):
            group.fence = service.lease if len(groups) == 1 else PartitionFence(service.lease, client, k.namespace)
        if publisher is not None:
            publisher.fence = service.lease
        service.run_identity, service.namespace = (run := await join_run(redis, keys)), keys.namespace
        service.partitions = config.bus.partitions
        if parallel.is_main:  # rank 0 logs the run: W&B (optional), and eval results and producers next to steps
            service.metrics.wandb = WandbRun(config.wandb, run_id=f"{keys.namespace}-{run.id}", name=keys.namespace,
                                             settings=_loggable(config))  # fmt: skip
            follower = asyncio.create_task(RunFollower(redis, keys, service.metrics, step=lambda: progress.step,
                                                       version=lambda: progress.version,
                                                       ttl_s=config.bus.heartbeat_ttl_s,
                                                       block_ms=config.bus.block_ms).run())  # fmt: skip

        def on_data_loss() -> None:  # write nothing more into what Redis holds now; stop
            assert service.lease is not None
            service.lease.lost = "Redis lost this run's data"
            stop.set()

        async with (
            MetricsServer(config.metrics, _exported(service, consumer, groups, redis, keys, parallel)),
            Heartbeat(redis, keys, role="trainer", member_id=name, config=config.bus, run=run,
                      on_data_loss=on_data_loss,
                      describe=lambda: {"step": progress.step, "version": progress.version,
                                        "rollout_batch_size": config.buffer.rollout_batch_size,
                                        "max_staleness": config.buffer.max_staleness,
                                        "publish_every": cfg.publish_every, "held": service.held,
                                        "lease_token": service.lease.token if service.lease else 0,
                                        "read_per_batch": buffer.counters.read_per_batch,
                                        "waiting": service.waiting}) as beat,
        ):  # fmt: skip
            service.on_change = beat.beat_now  # producers' admission reads the version and held count at once
            try:
                await service.run(stop, resume=resume)
            except LeaseLostError as exc:
                if beat.data_lost is not None:
                    raise beat.data_lost from exc
                await verify_run(redis, keys, run)  # the lease may have gone with all the rest: say that
                raise
    finally:
        if follower is not None:
            try:  # what it logs is a view of the run: its failure is said, never the trainer's
                if not await aio.stop_task(follower, timeout_s=2.0):
                    log.error("run_follower_did_not_stop")
            except Exception as exc:
                log.error("run_follower_failed", error=repr(exc))
        if service.lease is not None and parallel.is_main:
            await service.lease.release()  # a standby need not wait out the ttl
        service.metrics.close()
        await close_partition_clients(clients, redis)
        await blocking.aclose()
        await chunks.aclose()
        await redis.aclose()
    _log_stopped(service, buffer)
    return 0


async def _take_lease(config: RunConfig, parallel: DataParallel, redis: Any, keys: Keys, name: str,
                      stop: asyncio.Event, retry: RetryPolicy, clients: Sequence[Any],
                      parts: Sequence[Keys]) -> Lease:  # fmt: skip
    """Rank 0 takes the trainer lease (waiting trainer.standby_s for another's to end) and keeps renewing it,
    and with partitions installs its token in every partition's fence before any rank reads; the other ranks
    write under the same token. Whatever rank 0 meets is told to the other ranks, which wait for it in a
    collective: they raise it too, rather than wait there until the launcher ends them."""
    lease = Lease(redis, keys, "trainer", name, ttl_s=config.bus.lease_ttl_s, retry=retry)
    taken: tuple[str, Any] = ("", None)
    failure: Exception | None = None
    if parallel.is_main:
        try:
            await lease.acquire(config.trainer.standby_s, stop)
            await lease.start_renewing()
            if len(parts) > 1:
                for client, k in zip(clients, parts, strict=True):
                    await retry.run(PartitionFence(lease, client, k.namespace).install)
            taken = ("taken", (lease.token, lease.value))
        except LeaseHeldError as exc:
            taken = ("held", str(exc))
        except Exception as exc:  # e.g. fenced off at the install, or Redis away when told to stop
            failure, taken = exc, ("failed", f"rank 0 could not take the trainer lease: {exc}")
            with contextlib.suppress(Exception):  # a lease taken before the failure: let a standby have it now
                await lease.release()
    kind, what = parallel.gather(taken)[0]
    if failure is not None:
        raise failure
    if kind == "held":
        raise LeaseHeldError(what)
    if kind == "failed":
        raise MilesStreamError(what)
    lease.token, lease.value = what
    return lease


def _exported(service: TrainerService, consumer: GroupConsumer | PartitionedConsumer, groups: Sequence[GroupConsumer],
              redis: Any, keys: Keys, parallel: DataParallel) -> Collect:  # fmt: skip
    """What this rank's /metrics serves; rank 0 alone also reads the streams' lag and pending from Redis."""
    parts = [exporter.trainer_metrics(service, service.buffer.counters, consumer.counters),
             exporter.consumer_metrics("trainer", [g.stream for g in groups]),
             exporter.weight_version_metric("trainer", lambda: service.progress.version)]  # fmt: skip
    if parallel.is_main:
        loop = asyncio.get_running_loop()
        streams = [(redis, key) for key in keys.streams]
        if len(groups) > 1:  # the run's own streams from its slot, each partition's from its own
            streams = [(redis, key) for key in keys.streams if key not in keys.partition_streams]
            streams += [(g.redis, key) for g in groups for key in g.keys.partition_streams]
        parts.append(exporter.stream_metrics(lambda: _streams(streams), loop))
    return exporter.combine(*parts)


async def _streams(streams: Sequence[tuple[Any, str]]) -> list[StreamStatus]:
    return [await stream_status(client, key) for client, key in streams]


def _loggable(config: RunConfig) -> dict[str, Any]:
    """The run config for W&B, without the Redis section (its URL may hold a password)."""
    return {k: v for k, v in to_dict(config).items() if k not in ("redis", "redis_server")}


def _transport(config: RunConfig, redis: Any, keys: Keys, chunks: StreamClient) -> WeightTransport:
    if config.trainer.transport == "broadcast":
        from miles_stream.weights.broadcast import BroadcastSender

        return BroadcastSender(config.weights_group)
    if config.trainer.transport == "cuda_ipc":
        from miles_stream.weights.cuda_ipc import CudaIpcSender

        return CudaIpcSender()
    if config.trainer.transport == "file":
        return FileTransport(config.trainer.weights_dir)
    return RedisTransport(redis, keys, data=chunks)


def _backend(config: RunConfig, parallel: DataParallel) -> TrainerBackend:
    return build_backend(config.trainer, config.algo, temperature=config.trainer_temperature, parallel=parallel)


def _codec(config: RunConfig, trainer: TrainerBackend) -> GroupCodec:
    """The wire codec, also refusing token ids outside the model's vocabulary: such a group would crash the
    embedding lookup (a device-side assert on a GPU); it is dead-lettered with the reason instead."""
    return GroupCodec(config.codec, replace(DEFAULT_LIMITS, vocab_size=trainer.vocab_size))


def _log_stopped(service: TrainerService, buffer: ReplayBuffer) -> None:
    p, c = service.progress, buffer.counters
    log.info("trainer_stopped", step=p.step, version=p.version, groups=p.groups, stale_dropped=c.stale_dropped,
             recycled=c.recycled, filtered=c.filtered)  # fmt: skip
