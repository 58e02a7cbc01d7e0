"""Time to publish and to load one weight version over each transport, for a ~100M-parameter state.

    python bench/bench_weights.py [--params-m 100] [--dtype float32] [--json-out FILE]

A synthetic state of 2-D float tensors (hidden 1024 blocks) totalling --params-m million parameters. The
embedded Redis and a local directory stand for the data planes; "load" includes checksum verification.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import torch

from miles_stream.bus import Keys, RedisConfig, connect
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.weights.transports import FileTransport, RedisTransport
from miles_stream.weights.versions import WeightPublisher, WeightSubscriber


def make_state(params_m: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    per = 1024 * 4096
    n = max(1, params_m * 1_000_000 // per)
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(4096, 1024, generator=g).to(dtype) for i in range(n)}


async def measure(url: str, state: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    redis = connect(RedisConfig(url=url))
    keys = Keys("benchweights")
    out = {}
    with tempfile.TemporaryDirectory() as root:
        for transport in (RedisTransport(redis, keys), FileTransport(root)):
            publisher = WeightPublisher(redis, keys, transport)
            subscriber = WeightSubscriber(redis, keys, {transport.name: transport})
            t = time.perf_counter()
            manifest = await publisher.publish(1 if transport.name == "redis" else 2, state)
            publish_s = time.perf_counter() - t
            t = time.perf_counter()
            loaded = await subscriber.load(manifest)
            load_s = time.perf_counter() - t
            assert all(torch.equal(loaded[k], v) for k, v in state.items())
            out[transport.name] = {"bytes": manifest.nbytes, "publish_s": publish_s, "load_s": load_s}
            mb = manifest.nbytes / 1e6
            print(f"{transport.name:6s} {mb:8.1f} MB  publish {publish_s:6.2f} s  load+verify {load_s:6.2f} s")
    await redis.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=int, default=100)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    state = make_state(args.params_m, getattr(torch, args.dtype))
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none", maxmemory="8gb")) as server:
        results = asyncio.run(measure(server.url, state))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"params": sum(v.numel() for v in state.values()), **results}, f, indent=2)


if __name__ == "__main__":
    main()
