"""`miles-stream produce`: a rollout producer. Claims prompts, samples, scores, publishes trajectory groups."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import structlog
import torch

from miles_stream import aio
from miles_stream.aio import stop_task
from miles_stream.bus import (
    Backpressure,
    GroupPublisher,
    Heartbeat,
    Keys,
    RetryPolicy,
    StreamClient,
    StreamConsumer,
    connect,
    open_stream_client,
    wait_until_reachable,
)
from miles_stream.bus.keys import partition_keys
from miles_stream.bus.partitioned import close_partition_clients, partition_clients
from miles_stream.bus.run import check_partitions, join_run
from miles_stream.codec import GroupCodec
from miles_stream.config import check_model_dir
from miles_stream.engines.base import SamplingParams
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.errors import ConfigError
from miles_stream.metrics_http import MetricsServer
from miles_stream.rewards import RewardRegistry
from miles_stream.rollout.admission import Admission
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.engines import open_engine
from miles_stream.rollout.producer import Lane, RolloutProducer
from miles_stream.rollout.turns import Calculator, RolloutFn, ToolLoop, single_turn
from miles_stream.run_config import RunConfig
from miles_stream.status.exporter import combine, consumer_metrics, producer_metrics, weight_version_metric
from miles_stream.weights.transports import FileTransport, RedisTransport, WeightTransport
from miles_stream.weights.versions import WeightSubscriber

log = structlog.get_logger("producers.rollout")


def main(config: RunConfig) -> int:
    check_model_dir(config.rollout.model, "rollout.model")
    return aio.run_process(lambda stop: _run(config, stop), what="the producer")


async def _run(config: RunConfig, stop: asyncio.Event) -> int:
    from transformers import AutoTokenizer

    cfg, keys = config.rollout, Keys(config.bus.namespace)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    reward_fn = RewardRegistry().get(cfg.reward)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    redis, data = connect(config.redis), open_stream_client(config.redis)
    try:
        await wait_until_reachable(redis, config.redis, stop)
        await check_partitions(redis, keys, config.bus.partitions)
    except BaseException:
        await redis.aclose()
        await data.aclose()
        raise
    name = cfg.resolved_producer_id()
    engine, membership = await open_engine(cfg, redis, keys.sglang_servers(name))
    blocking = open_stream_client(config.redis, block_ms=config.bus.block_ms)
    codec = GroupCodec(config.codec)
    parts = partition_keys(keys.namespace, config.bus.partitions)
    clients = partition_clients(config.redis, parts, redis)
    partitions = list(zip(clients, parts, strict=True))
    lanes = [_lane(config, client, blocking, data, k, name, codec, stop) for client, k in partitions]
    prompts, partials, publisher = lanes[0].prompts, lanes[0].partials, lanes[0].publisher
    admission = Admission(redis, keys, config.bus, producer_id=name, own_version=lambda: engine.weight_version,
                          over_sampling=cfg.over_sampling, partitions=partitions)  # fmt: skip
    rollout_fn, sampling = _turns(cfg, tokenizer)
    chunks = open_stream_client(config.redis)  # weight chunks on a connection of their own, off the event loop
    transports: dict[str, WeightTransport] = {"redis": RedisTransport(redis, keys, data=chunks),
                                              "file": FileTransport("")}  # fmt: skip
    if cfg.weights_rank:  # in the trainer's broadcast group: versions arrive on this engine's device
        from miles_stream.weights.broadcast import BroadcastReceiver

        if not isinstance(engine, NativeEngine):
            raise ConfigError("rollout.weights_rank: the broadcast transport feeds the native engine")
        transports["broadcast"] = BroadcastReceiver(config.weights_group, cfg.weights_rank, engine.model.state_dict())
    if isinstance(engine, NativeEngine) and engine.device.type == "cuda":  # a trainer on this host's GPU
        from miles_stream.weights.cuda_ipc import CudaIpcReceiver

        transports["cuda_ipc"] = CudaIpcReceiver(engine.device)
    weights = WeightSubscriber(redis, keys, transports)
    producer = RolloutProducer(cfg, engine=engine, tokenizer=tokenizer, reward_fn=reward_fn, prompts=prompts,
                               publisher=publisher, partials=partials, admission=admission, rollout_fn=rollout_fn,
                               sampling=sampling, weights=weights, codec=codec, lanes=lanes)  # fmt: skip
    try:
        run = await join_run(redis, keys)
        exported = combine(producer_metrics(producer, admission), consumer_metrics("producer", producer.sources),
                           weight_version_metric("producer", lambda: engine.weight_version))  # fmt: skip
        async with (
            MetricsServer(config.metrics, exported),
            Heartbeat(redis, keys, role="producer", member_id=producer.producer_id, config=config.bus, run=run,
                      on_data_loss=stop.set,
                      describe=lambda: {"groups": producer.counters.groups, "in_flight": producer.in_flight,
                                        "tokens": producer.counters.tokens, "weight_version": engine.weight_version,
                                        "engine": cfg.engine,
                                        "waiting": _waiting(producer, admission)}) as beat,
        ):  # fmt: skip
            await producer.run(stop)
        if beat.data_lost is not None:
            raise beat.data_lost
    finally:
        if membership is not None:
            await stop_task(membership)
        await engine.close()
        await close_partition_clients(clients, redis)
        for client in (blocking, data, chunks, redis):
            await client.aclose()
    log.info("producer_stopped", **dataclasses.asdict(producer.counters))
    return 0


def _lane(config: RunConfig, redis: Any, blocking: StreamClient, data: StreamClient, keys: Keys, name: str,
          codec: GroupCodec, stop: asyncio.Event) -> Lane:  # fmt: skip
    """One partition's prompt and partial consumers and trajectory publisher (each partition's backlog bounded by
    its share of bus.max_backlog_entries and bus.max_backlog_bytes, so the run's bounds are those of one stream)."""
    prompts, partials = (StreamConsumer(redis, blocking, stream=stream, group="producers", consumer=name,
                                        dead_stream=keys.dead, config=config.bus)
                         for stream in (keys.prompts, keys.partials))  # fmt: skip
    n = config.bus.partitions
    bounds = dataclasses.replace(config.bus, max_backlog_entries=-(-config.bus.max_backlog_entries // n),
                                 max_backlog_bytes=-(-config.bus.max_backlog_bytes // n))  # fmt: skip
    publisher = GroupPublisher(data, keys.trajectories, config.bus, codec=codec,
                               backpressure=Backpressure(redis, keys.trajectories, bounds),
                               retry=RetryPolicy(attempts=0, max_delay_s=2.0, stop=stop))  # fmt: skip
    return Lane(keys, prompts, publisher, partials)


def _waiting(producer: RolloutProducer, admission: Admission) -> str:
    """What the producer waits on now, for `status --watch`: room in the staleness budget, the trainer to read
    (backpressure), or prompts (nothing in flight and not held back)."""
    if admission.waiting:
        return "admission"
    if any(lane.publisher.backpressure is not None and lane.publisher.backpressure.waiting for lane in producer.lanes):
        return "backpressure"
    return "data" if producer.in_flight == 0 else ""


def _turns(cfg: RolloutConfig, tokenizer: Any) -> tuple[RolloutFn, SamplingParams]:
    """rollout.turns -> how a sample is rolled out; the calculator also stops each turn at "="."""
    if cfg.turns == "calculator":
        equals = tokenizer.convert_tokens_to_ids("=")
        sampling = dataclasses.replace(cfg.sampling, stop_token_ids=(*cfg.sampling.stop_token_ids, equals))
        return ToolLoop(Calculator(tokenizer), max_turns=cfg.max_turns), sampling
    return single_turn, cfg.sampling
