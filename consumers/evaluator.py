"""`miles-stream eval`: an evaluator. Follows `{ns}:weights`, scores versions on a held-out set, announces the
results on `{ns}:eval` (docs/evaluation.md; the loop is `miles_stream/evaluation/evaluator.py`)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import replace
from pathlib import Path

import structlog
import torch

from miles_stream import aio
from miles_stream.aio import stop_task
from miles_stream.bus import Heartbeat, Keys, connect, open_stream_client, wait_until_reachable
from miles_stream.bus.run import join_run
from miles_stream.config import check_model_dir
from miles_stream.errors import ConfigError
from miles_stream.evaluation.evaluator import Evaluator
from miles_stream.evaluation.sinks import EvalFiles
from miles_stream.feeder import FeederConfig, Row, load_rows
from miles_stream.metrics_http import MetricsServer
from miles_stream.rewards import RewardRegistry
from miles_stream.rollout.engines import open_engine
from miles_stream.run_config import RunConfig
from miles_stream.status.exporter import eval_metrics
from miles_stream.weights.transports import FileTransport, RedisTransport, WeightTransport
from miles_stream.weights.versions import WeightSubscriber

log = structlog.get_logger("consumers.evaluator")


def main(config: RunConfig) -> int:
    check_model_dir(config.rollout.model, "rollout.model")
    rows = _rows(config)  # a bad dataset fails here, in one line, before Redis or the engine
    reward_fn = RewardRegistry().get(config.eval.reward or config.rollout.reward)
    return aio.run_process(lambda stop: _run(config, rows, reward_fn, stop), what="the evaluator")


def _rows(config: RunConfig) -> list[Row]:
    cfg = config.eval
    if not cfg.path or not Path(cfg.path).is_file():
        raise ConfigError(f"eval.path: {cfg.path!r} is not a file (the held-out .jsonl or .parquet set)")
    rows = load_rows(FeederConfig(path=cfg.path, prompt_key=cfg.prompt_key, label_key=cfg.label_key))
    return rows[: cfg.limit] if cfg.limit else rows


async def _run(config: RunConfig, rows: list[Row], reward_fn: object, stop: asyncio.Event) -> int:
    from transformers import AutoTokenizer

    cfg, rollout, keys = config.eval, config.rollout, Keys(config.bus.namespace)
    name = cfg.evaluator_id or f"evaluator-{socket.gethostname()}-{os.getpid()}"
    if rollout.torch_threads:
        torch.set_num_threads(rollout.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(rollout.model)
    redis = connect(config.redis)  # its reads block bus.block_ms at most (the producer's weight follower's too)
    chunks = open_stream_client(config.redis)  # weight chunks on a connection of their own
    files = EvalFiles(cfg.out, cfg.tensorboard_dir)
    engine, membership = None, None
    try:
        await wait_until_reachable(redis, config.redis, stop)
        engine, membership = await open_engine(replace(rollout, producer_id=name), redis, keys.sglang_servers(name))
        transports: dict[str, WeightTransport] = {"redis": RedisTransport(redis, keys, data=chunks),
                                                  "file": FileTransport("")}  # fmt: skip
        evaluator = Evaluator(cfg, engine=engine, tokenizer=tokenizer, reward_fn=reward_fn, rows=rows,
                              sampling=rollout.sampling, weights=WeightSubscriber(redis, keys, transports),
                              redis=redis, keys=keys, evaluator_id=name, max_batch=rollout.max_batch,
                              reward_timeout_s=rollout.reward_timeout_s, block_ms=config.bus.block_ms,
                              sinks=[files])  # fmt: skip
        c, run = evaluator.counters, await join_run(redis, keys)
        async with (
            MetricsServer(config.metrics, eval_metrics(c)),
            Heartbeat(redis, keys, role="evaluator", member_id=name, config=config.bus, run=run, on_data_loss=stop.set,
                      describe=lambda: {"eval_version": c.last.version if c.last else -1, "evaluated": c.evaluated,
                                        "skipped": c.skipped, "waiting": c.waiting, "rate_per_min": c.rate_per_min,
                                        "pass_at_1": c.last.pass_at_1 if c.last else None,
                                        "engine": rollout.engine, "dataset": cfg.path}) as beat,
        ):  # fmt: skip
            await evaluator.run(stop)
        if beat.data_lost is not None:  # Redis lost the run (bus/run.py): say so, as the producer does
            raise beat.data_lost
    finally:
        if membership is not None:
            await stop_task(membership)
        if engine is not None:
            await engine.close()
        files.close()
        for client in (chunks, redis):
            await client.aclose()
    log.info("evaluator_stopped", evaluated=evaluator.counters.evaluated, skipped=evaluator.counters.skipped)
    return 0
