"""Load: many producers against one trainer. What does each producer cost Redis? (issue 25, item 4)

    python bench/bench_load.py --producers 100 --rate 0.5 --seconds 60 --json-out bench/results/load_100.json
    python bench/bench_load.py --producers 100 --rate 0.5 --seconds 60 --cluster 3 (on a 3-primary local cluster)
    python bench/bench_load.py --producers 100 --rate 0.5 --seconds 60 --cluster 3 --partitions 3 (bus.partitions)
    python bench/bench_load.py --producers 100 --processes 100 ... (each producer a process of its own)

One embedded Redis (or, with --cluster N, a Redis Cluster of N primaries on loopback: the run's keys in one slot,
so its primary carries the run and the rest is the cluster clients' own cost; with --partitions N the streams
split N ways, each partition in a slot of its own, as `bus.partitions` does). In this process: the feeder and a
trainer loop (`ReplayBuffer` over the "trainer" `GroupConsumer`, with a heartbeat, no model) committing every
batch; and --producers `RolloutProducer`s, each with its own connections, heartbeat, admission and backpressure
(as `miles-stream produce` builds them), here too, or with --processes P spread over P forked processes (each its
own event loop and connections, as P `miles-stream produce` processes would be). Each producer's engine takes
1/--rate seconds a group and answers random tokens. Simulation is fine: the bus is measured.

After --warmup seconds it reads Redis's INFO (commandstats, cpu) at the start and the end of the window:
commands/s by command and per producer, Redis CPU (user + sys seconds per second), groups/s committed, and the
publish latency (GroupPublisher.publish, the wait for room included) p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_soak import ByteTokenizer, InstantEngine, coin, train

from miles_stream.buffer.config import BufferConfig
from miles_stream.buffer.replay import ReplayBuffer
from miles_stream.bus import BusConfig, GroupConsumer, GroupPublisher, Heartbeat, Keys, StreamConsumer, connect
from miles_stream.bus.backpressure import Backpressure
from miles_stream.bus.connection import RedisConfig
from miles_stream.bus.dataplane import open_stream_client
from miles_stream.bus.keys import PRODUCER_GROUP, TRAINER_GROUP, partition_keys
from miles_stream.bus.partitioned import PartitionedConsumer, partition_clients
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.redis_cluster import LocalCluster
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.rollout.admission import Admission
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.producer import Lane, RolloutProducer
from miles_stream.schema import TrajectoryGroup

PUBLISH_S: list[tuple[float, float]] = []  # (wall clock at the end, seconds) of each publish


class TimedPublisher(GroupPublisher):
    async def publish(self, group: TrajectoryGroup, **kwargs: Any) -> tuple[str, int] | None:
        started = time.perf_counter()
        try:
            return await super().publish(group, **kwargs)
        finally:
            PUBLISH_S.append((time.time(), time.perf_counter() - started))


class PacedEngine(InstantEngine):
    def __init__(self, length: int, seed: int, seconds: float) -> None:
        super().__init__(length, seed)
        self.seconds = seconds

    async def generate(self, requests: Any) -> Any:
        await asyncio.sleep(self.seconds)
        return await super().generate(requests)


def in_flight(producer: RolloutProducer) -> dict[str, Any]:
    return {"in_flight": producer.in_flight}


async def redis_counts(nodes: list[str]) -> tuple[dict[str, int], list[float]]:
    """Commands by name, summed over `nodes` (one server, or every node of a cluster), and each node's CPU seconds."""
    calls: dict[str, int] = {}
    cpu_s: list[float] = []
    for url in nodes:
        client = connect(RedisConfig(url=url))
        try:
            stats = await client.info("commandstats")
            cpu = await client.info("cpu")
        finally:
            await client.aclose()
        for k, v in stats.items():
            calls[k.removeprefix("cmdstat_")] = calls.get(k.removeprefix("cmdstat_"), 0) + int(v["calls"])
        cpu_s.append(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))
    return calls, cpu_s


def redis_config(args: argparse.Namespace, url: str, keys: Keys) -> RedisConfig:
    """As RunConfig does for a process: on a cluster, the control client pinned to the run's slot, unless the
    bench is told to use redis-py's cluster client."""
    return RedisConfig(url=url, slot_of=keys.namespace if args.cluster and args.cluster_client == "pinned" else "")


def start_producers(args: argparse.Namespace, rc: RedisConfig, keys: Keys, numbers: range, stop: asyncio.Event,
                    closers: list[Any]) -> list[asyncio.Task[Any]]:  # fmt: skip
    """Producers `numbers` as `miles-stream produce` builds one (producers/rollout.py), each with its own
    connections, heartbeat, admission and backpressure (each partition's bounds its share of the run's)."""
    bus = BusConfig(namespace=keys.namespace, partitions=args.partitions)
    parts = partition_keys(keys.namespace, args.partitions)
    bounds = dataclasses.replace(bus, max_backlog_entries=-(-bus.max_backlog_entries // args.partitions),
                                 max_backlog_bytes=-(-bus.max_backlog_bytes // args.partitions))  # fmt: skip
    tasks = []
    for p in numbers:
        name = f"p{p}"
        own, blocking = connect(rc), open_stream_client(rc)
        plane = open_stream_client(rc)
        owns = partition_clients(rc, parts, own)  # as producers/rollout.py: a control client per partition's slot
        closers += [own, blocking, plane, *(c for c in set(owns) if c is not own)]
        lanes = [
            Lane(k, StreamConsumer(c, blocking, stream=k.prompts, group=PRODUCER_GROUP, consumer=name,
                                   dead_stream=k.dead, config=bus),
                 TimedPublisher(plane, k.trajectories, bus, backpressure=Backpressure(c, k.trajectories, bounds)),
                 StreamConsumer(c, blocking, stream=k.partials, group=PRODUCER_GROUP, consumer=name,
                                dead_stream=k.dead, config=bus))
            for c, k in zip(owns, parts, strict=True)
        ]  # fmt: skip
        config = RolloutConfig(model="load", producer_id=name, n_samples_per_prompt=4, max_inflight_prompts=1)
        engine = PacedEngine(16, p, 1 / args.rate)
        admission = Admission(own, keys, bus, producer_id=name, own_version=lambda: 0,
                              partitions=list(zip(owns, parts, strict=True)))  # fmt: skip
        producer = RolloutProducer(config, engine=engine, tokenizer=ByteTokenizer(), reward_fn=coin,
                                   prompts=lanes[0].prompts, partials=lanes[0].partials,
                                   publisher=lanes[0].publisher, admission=admission, lanes=lanes)  # fmt: skip
        beat = Heartbeat(own, keys, role="producer", member_id=name, config=bus,
                         describe=functools.partial(in_flight, producer))  # fmt: skip

        async def produce(producer: RolloutProducer = producer, beat: Heartbeat = beat) -> None:
            async with beat:
                await producer.run(stop)

        tasks.append(asyncio.create_task(produce()))
    return tasks


def producer_process(args: argparse.Namespace, url: str, keys: Keys, numbers: range, done: Any, out: Path) -> None:
    """A forked process running producers `numbers` until `done` is set; writes its publish times to `out`."""

    async def main() -> None:
        stop, closers = asyncio.Event(), []
        tasks = start_producers(args, redis_config(args, url, keys), keys, numbers, stop, closers)
        while not done.is_set() and not any(t.done() for t in tasks):  # noqa: ASYNC110 (a process's Event)
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait(tasks, timeout=60)
        for c in closers:
            await c.aclose()
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]

    PUBLISH_S.clear()
    asyncio.run(main())
    out.write_text(json.dumps(PUBLISH_S))


async def run(args: argparse.Namespace, url: str, nodes: list[str], keys: Keys, data: Path) -> dict[str, Any]:
    bus = BusConfig(namespace=keys.namespace, partitions=args.partitions)
    parts = partition_keys(keys.namespace, args.partitions)
    rc = redis_config(args, url, keys)
    redis = connect(rc)
    stop = asyncio.Event()
    feeder_config = FeederConfig(path=str(data), num_epochs=0, max_queued=4 * args.producers)
    closers: list[Any] = []
    clients = partition_clients(rc, parts, redis)
    closers += [c for c in set(clients) if c is not redis]
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(Feeder(redis, keys, bus, feeder_config, load_rows(feeder_config),
                                   list(zip(clients, parts, strict=True))).run(stop))
    ]  # fmt: skip
    if not args.processes:  # else the forked processes run them
        tasks += start_producers(args, rc, keys, range(args.producers), stop, closers)
    blocking = open_stream_client(rc)
    closers.append(blocking)
    groups = [GroupConsumer(StreamConsumer(c, blocking, stream=k.trajectories, group=TRAINER_GROUP, consumer="t0",
                                           dead_stream=k.dead, config=bus), k, owns_prompts=True, partition=i)
              for i, (c, k) in enumerate(zip(clients, parts, strict=True))]  # fmt: skip
    consumer: Any = groups[0] if len(groups) == 1 else PartitionedConsumer(groups, range(len(groups)))
    buffer = ReplayBuffer(consumer, BufferConfig(rollout_batch_size=16, max_staleness=-1, filters=(), capacity=64))
    committed: list[str] = []
    beat = Heartbeat(redis, keys, role="trainer", member_id="t0", config=bus,
                     describe=lambda: {"max_staleness": -1, "rollout_batch_size": 16})  # fmt: skip

    async def run_trainer() -> None:
        async with beat:
            await train(buffer, committed, stop)

    tasks.append(asyncio.create_task(run_trainer()))
    try:
        await asyncio.sleep(args.warmup)
        calls0, cpu0, done0, t0, w0 = *(await redis_counts(nodes)), len(committed), time.monotonic(), time.time()
        await asyncio.sleep(args.seconds)
        calls1, cpu1, done1, t1, w1 = *(await redis_counts(nodes)), len(committed), time.monotonic(), time.time()
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=60)
        for c in closers:
            await c.aclose()
        await redis.aclose()
    wall = t1 - t0
    per_s = {k: round((calls1.get(k, 0) - calls0.get(k, 0)) / wall, 1) for k in calls1}
    per_s = dict(sorted(((k, v) for k, v in per_s.items() if v > 0), key=lambda kv: -kv[1]))
    total = sum(per_s.values())
    return {
        "window": [w0, w1],
        "producers": args.producers, "processes": args.processes or 1, "rate_per_producer": args.rate,
        "window_s": round(wall, 1),
        "server": f"{args.cluster} primaries, {args.cluster_client} client" if args.cluster else "one server",
        "partitions": args.partitions,
        "groups_per_s": round((done1 - done0) / wall, 1),
        "redis_commands_per_s": round(total, 1), "per_producer_commands_per_s": round(total / args.producers, 2),
        "redis_cpu_share": round((sum(cpu1) - sum(cpu0)) / wall, 3),
        "redis_cpu_share_by_node": [round((b - a) / wall, 3) for a, b in zip(cpu0, cpu1, strict=True)],
        "commands_per_s": per_s,
    }  # fmt: skip


def latency(result: dict[str, Any], publishes: list[tuple[float, float]]) -> None:
    """Publish p50/p99 over the publishes that ended in the measured window."""
    w0, w1 = result.pop("window")
    latencies = sorted(s for at, s in publishes if w0 <= at <= w1)
    result["publishes"] = len(latencies)
    result["publish_p50_ms"] = round(1000 * statistics.median(latencies), 2) if latencies else None
    result["publish_p99_ms"] = round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--producers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.5, help="groups/s each producer makes")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--cluster", type=int, default=0, metavar="N", help="a local cluster of N primaries")
    parser.add_argument("--cluster-client", choices=["pinned", "redis-py"], default="pinned",
                        help="the control client on the cluster: pinned to the run's slot (what processes use), or "
                        "redis-py's RedisCluster")  # fmt: skip
    parser.add_argument("--partitions", type=int, default=1, metavar="N", help="bus.partitions: N-way streams")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="P",
        help="run the producers in P forked processes (P divides --producers); 0: in this one",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.processes and args.producers % args.processes:
        parser.error("--processes must divide --producers")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.cluster:
            cluster = stack.enter_context(LocalCluster(primaries=args.cluster))
            url, nodes = cluster.url, [n.url for n in cluster.nodes]
        else:
            server = stack.enter_context(EmbeddedRedis(EmbeddedRedisConfig(persistence="none")))
            url, nodes = server.url, [server.url]
        keys = Keys(f"{{load{int(time.time())}}}" if args.cluster else f"load{int(time.time())}")
        data = work / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(1000)))
        fork = multiprocessing.get_context("fork")  # before any event loop: the children share this one's imports
        done, procs = fork.Event(), []
        each = args.producers // args.processes if args.processes else 0
        for i in range(args.processes):
            numbers = range(i * each, (i + 1) * each)
            procs.append(fork.Process(target=producer_process, args=(args, url, keys, numbers, done,
                                                                     work / f"publish-{i}.json")))  # fmt: skip
            procs[-1].start()
        try:
            result = asyncio.run(run(args, url, nodes, keys, data))
        finally:
            done.set()
            for proc in procs:
                proc.join(timeout=90)
        publishes = list(PUBLISH_S)
        for i, proc in enumerate(procs):
            if proc.exitcode != 0:
                raise SystemExit(f"producer process {i} exited with {proc.exitcode}")
            publishes += [tuple(x) for x in json.loads((work / f"publish-{i}.json").read_text())]
        latency(result, publishes)
    result["machine"] = platform.processor() or platform.machine()
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
