"""rollout.engine -> a started engine: the one place a config name meets an engine's code (`engines/`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from miles_stream.engines.base import RolloutEngine
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.engines.sglang.engine import SGLangEngine, moe_layout
from miles_stream.engines.vllm.engine import VLLMEngine
from miles_stream.engines.vllm.updates import checkpoint_names, refuse_unfaithful
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.membership import follow_membership

Opened = tuple[RolloutEngine, "asyncio.Task[None] | None"]


async def _native(cfg: RolloutConfig, redis: Any, servers_key: str) -> Opened:
    engine = NativeEngine(cfg.model, device=cfg.device, dtype=getattr(torch, cfg.dtype), max_batch=cfg.max_batch,
                          seed=cfg.seed, kv_cache=cfg.kv_cache, max_seq_len=cfg.max_seq_len,
                          cuda_graphs=cfg.cuda_graphs, compile_decode=cfg.compile_decode,
                          precision=cfg.precision)  # fmt: skip
    return engine, None


async def _sglang(cfg: RolloutConfig, redis: Any, servers_key: str) -> Opened:
    """SGLang servers, and the task that follows `servers_key` (`miles-stream sglang --attach/--detach`)."""
    engine = SGLangEngine(cfg.sglang, layout=moe_layout(cfg.model))
    if cfg.sglang.urls:
        await redis.sadd(servers_key, *cfg.sglang.urls)
    await engine.start()
    follow = asyncio.create_task(follow_membership(redis, servers_key, engine, cfg.sglang.health_interval_s))
    return engine, follow


async def _vllm(cfg: RolloutConfig, redis: Any, servers_key: str) -> Opened:
    """vLLM servers (refused for a model vLLM does not reload faithfully), and the task that follows
    `servers_key` as for SGLang."""
    refuse_unfaithful(cfg.model)
    engine = VLLMEngine(cfg.vllm, sampling=cfg.sampling, weight_names=checkpoint_names(cfg.model))
    await redis.sadd(servers_key, *cfg.vllm.urls)
    await engine.start()
    follow = asyncio.create_task(follow_membership(redis, servers_key, engine, cfg.vllm.health_interval_s))
    return engine, follow


ENGINES: dict[str, Callable[[RolloutConfig, Any, str], Awaitable[Opened]]] = {
    "native": _native, "sglang": _sglang, "vllm": _vllm}  # fmt: skip


async def open_engine(cfg: RolloutConfig, redis: Any, servers_key: str) -> Opened:
    """The engine `cfg.engine` names (RolloutConfig validates the name), started, and the task that follows
    its server list where it has one (stop it before closing the engine)."""
    return await ENGINES[cfg.engine](cfg, redis, servers_key)
