"""Soak: does Redis memory stay flat over a long run, with the accounting still exact? (issue 25, item 1)

    python bench/bench_soak.py --minutes 10 --json-out bench/results/soak.json
    python bench/bench_soak.py --minutes 10 --done-sweep-s 1e9     # the sweep off: the done set as it was

One process, one embedded Redis (no persistence), the real bus and producer code with nothing slow in it: the
feeder cycles a dataset of --prompts prompts for ever (each epoch new group ids), --producers
`RolloutProducer`s share it with an engine that answers at once (random tokens) and a reward that is a coin,
and a trainer loop (`ReplayBuffer` over the "trainer" `GroupConsumer`, as `miles-stream train` reads) commits
every batch without a model. Hours of a real run's groups pass in minutes.

Every --sample-s it records Redis's used_memory, the done set's members and count, `prompt_of` records and the
streams' lengths. At the end: every group id the trainer committed, committed once (the trainer's own list),
and the done count equal to it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from miles_stream.buffer.config import BufferConfig
from miles_stream.buffer.replay import ReplayBuffer
from miles_stream.bus import BusConfig, GroupConsumer, GroupPublisher, Keys, StreamConsumer, connect
from miles_stream.bus.connection import RedisConfig
from miles_stream.bus.dataplane import open_stream_client
from miles_stream.bus.done import done_count
from miles_stream.bus.keys import PRODUCER_GROUP, TRAINER_GROUP
from miles_stream.engines.base import GenerationRequest, GenerationResult
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.producer import RolloutProducer


class InstantEngine:
    """Answers every request at once with `length` random tokens (the bus is what is measured)."""

    weight_version = 0

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.rng = length, np.random.default_rng(seed)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        await asyncio.sleep(0)
        return [
            GenerationResult(
                request_id=r.request_id,
                response_ids=self.rng.integers(3, 60, self.length, dtype=np.int32),
                logprobs=np.full(self.length, -1.0, np.float32),
                finish_reason="stop",
                version_spans=np.zeros((1, 2), np.int64),
            )
            for r in requests
        ]

    async def update_weights(self, version: int, state: Any) -> None: ...
    async def abort(self, request_ids: Sequence[str]) -> None: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def close(self) -> None: ...


class ByteTokenizer:
    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode()[:64])}

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return [bytes(r).decode(errors="replace") for r in rows]


def coin(sample: Any) -> float:
    return float(hash(sample.response) & 1)


async def train(buffer: ReplayBuffer, committed: list[str], stop: asyncio.Event) -> None:
    await buffer.start()
    while not stop.is_set():
        batch = await buffer.next_batch(0, stop)
        if batch is None:
            return
        await buffer.commit(batch.items)
        committed += [r.group_id for r in batch.items]


async def sample(redis: Any, keys: Keys, started: float, committed: list[str]) -> dict[str, Any]:
    info = await redis.info("memory")
    return {
        "t_s": round(time.monotonic() - started, 1),
        "committed": len(committed),
        "used_memory_mb": round(info["used_memory"] / 2**20, 2),
        "done_members": await redis.zcard(keys.done(TRAINER_GROUP)),
        "done_count": await done_count(redis, keys.done(TRAINER_GROUP)),
        "prompt_of": await redis.hlen(keys.prompt_of),
        "streams": {k.split(":")[-1]: await redis.xlen(k) for k in (keys.prompts, keys.trajectories, keys.partials)},
    }


async def run(args: argparse.Namespace, url: str, work: Path) -> dict[str, Any]:
    keys = Keys(f"soak{int(time.time())}")
    bus = BusConfig(
        namespace=keys.namespace, claim_idle_ms=args.claim_idle_ms, done_sweep_s=args.done_sweep_s, block_ms=50
    )
    data = work / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(args.prompts))
    )
    redis, blocking = connect(RedisConfig(url=url)), open_stream_client(RedisConfig(url=url))
    stop = asyncio.Event()
    feeder_config = FeederConfig(path=str(data), num_epochs=0, max_queued=args.max_queued)
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(Feeder(redis, keys, bus, feeder_config, load_rows(feeder_config)).run(stop))
    ]
    producers = []
    for p in range(args.producers):
        name = f"p{p}"
        prompts, partials = (
            StreamConsumer(
                redis, blocking, stream=s, group=PRODUCER_GROUP, consumer=name, dead_stream=keys.dead, config=bus
            )
            for s in (keys.prompts, keys.partials)
        )
        config = RolloutConfig(
            model="soak", producer_id=name, n_samples_per_prompt=args.samples, max_inflight_prompts=args.inflight
        )
        producer = RolloutProducer(
            config,
            engine=InstantEngine(args.response_len, p),
            tokenizer=ByteTokenizer(),
            reward_fn=coin,
            prompts=prompts,
            partials=partials,
            publisher=GroupPublisher(blocking, keys.trajectories, bus),
        )
        producers.append(producer)
        tasks.append(asyncio.create_task(producer.run(stop)))
    consumer = GroupConsumer(
        StreamConsumer(
            redis,
            blocking,
            stream=keys.trajectories,
            group=TRAINER_GROUP,
            consumer="t0",
            dead_stream=keys.dead,
            config=bus,
        ),
        keys,
        owns_prompts=True,
    )
    buffer = ReplayBuffer(
        consumer,
        BufferConfig(
            rollout_batch_size=args.batch, max_staleness=-1, filters=(), capacity=4 * args.batch, read_count=args.batch
        ),
    )
    committed: list[str] = []
    tasks.append(asyncio.create_task(train(buffer, committed, stop)))
    started = time.monotonic()
    samples = []
    try:
        while time.monotonic() - started < args.minutes * 60:
            await asyncio.sleep(args.sample_s)
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            samples.append(await sample(redis, keys, started, committed))
            print(json.dumps(samples[-1]), flush=True)
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=30)
    final = await sample(redis, keys, started, committed)
    repeats = [g for g, n in collections.Counter(committed).items() if n > 1]
    await redis.aclose()
    await blocking.aclose()
    return {
        "samples": samples,
        "final": final,
        "committed": len(committed),
        "trained_twice": len(repeats),
        "groups_per_s": round(len(committed) / (final["t_s"] or 1), 1),
        "duplicates_dropped": consumer.counters.duplicates,
        "producers": [dataclasses.asdict(p.counters) for p in producers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--response-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-queued", type=int, default=256)
    parser.add_argument("--claim-idle-ms", type=int, default=10_000)
    parser.add_argument("--done-sweep-s", type=float, default=5.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as server, tempfile.TemporaryDirectory() as work:
        result = asyncio.run(run(args, server.url, Path(work)))
    result |= {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
