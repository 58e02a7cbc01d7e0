"""`miles-stream train`: a trainer consumer. Batches from the trajectory stream in, versioned weights out.

Data parallel: run it under torchrun (`torchrun --nproc-per-node 2 -m miles_stream.cli train ...`); each
rank reads `buffer.rollout_batch_size / world` groups per step as consumer `trainer-{rank}`.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
import torch

from miles_stream import aio
from miles_stream.buffer import ReplayBuffer
from miles_stream.bus import GroupConsumer, Heartbeat, Keys, StreamConsumer, connect, open_stream_client
from miles_stream.codec import GroupCodec
from miles_stream.errors import ConfigError
from miles_stream.run_config import RunConfig
from miles_stream.trainer.hf import export_hf, load_causal_lm
from miles_stream.trainer.metrics import MetricsSink
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.service import TrainerService
from miles_stream.trainer.step import PolicyTrainer
from miles_stream.weights import FileTransport, RedisTransport, WeightPublisher, WeightSubscriber, WeightTransport

log = structlog.get_logger("consumers.trainer")


def main(config: RunConfig, *, resume: bool = False) -> int:
    cfg = config.trainer
    if not cfg.model:
        raise ConfigError("trainer.model: set it to a local Hugging Face model directory")
    parallel = DataParallel.from_env(cfg.device)
    if config.buffer.rollout_batch_size % parallel.world:
        raise ConfigError(f"buffer.rollout_batch_size={config.buffer.rollout_batch_size} must divide evenly "
                          f"among {parallel.world} data-parallel ranks")  # fmt: skip
    try:
        return aio.run(_run(config, parallel, resume))
    finally:
        parallel.close()


async def _run(config: RunConfig, parallel: DataParallel, resume: bool) -> int:
    cfg, keys = config.trainer, Keys(config.bus.namespace)
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, device=cfg.device)
    needs_ref = config.algo.kl_loss_coef > 0 or config.algo.kl_coef > 0
    ref = load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype, device=cfg.device) if needs_ref else None
    if ref is not None:
        ref.requires_grad_(False).eval()
    trainer = PolicyTrainer(model, cfg, config.algo, temperature=config.trainer_temperature, ref_model=ref,
                            parallel=parallel)  # fmt: skip
    name = cfg.trainer_id or f"trainer-{parallel.rank}"
    redis, blocking = connect(config.redis), open_stream_client(config.redis, block_ms=config.bus.block_ms)
    stream = StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer=name,
                            dead_stream=keys.dead, config=config.bus)  # fmt: skip
    consumer = GroupConsumer(stream, keys, GroupCodec(config.codec), owns_prompts=True)
    buffer = ReplayBuffer(consumer, config.buffer, share=config.buffer.rollout_batch_size // parallel.world)
    transport: WeightTransport = RedisTransport(redis, keys) if cfg.transport == "redis" else FileTransport(
        cfg.weights_dir)  # fmt: skip
    publisher = WeightPublisher(redis, keys, transport, config.bus.heartbeat_ttl_s) if parallel.is_main else None
    subscriber = WeightSubscriber(redis, keys, {transport.name: transport})
    metrics = MetricsSink(cfg.metrics_path, cfg.tensorboard_dir) if parallel.is_main else MetricsSink()
    service = TrainerService(cfg, trainer=trainer, buffer=buffer, publisher=publisher, subscriber=subscriber,
                             metrics=metrics, export=lambda m, dest: export_hf(m, cfg.model, dest))  # fmt: skip
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    progress = service.progress
    try:
        async with Heartbeat(redis, keys, role="trainer", member_id=name, config=config.bus,
                             describe=lambda: {"step": progress.step, "version": progress.version,
                                               "rollout_batch_size": config.buffer.rollout_batch_size,
                                               "max_staleness": config.buffer.max_staleness}):  # fmt: skip
            await service.run(stop, resume=resume)
    finally:
        metrics.close()
        await blocking.aclose()
        await redis.aclose()
    log.info("trainer_stopped", step=progress.step, version=progress.version, groups=progress.groups,
             stale_dropped=buffer.counters.stale_dropped, recycled=buffer.counters.recycled,
             filtered=buffer.counters.filtered)  # fmt: skip
    return 0
