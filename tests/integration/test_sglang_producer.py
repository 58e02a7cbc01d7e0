"""`miles-stream produce` with rollout.engine=sglang, against stand-in SGLang servers (tests/sglang_standin.py;
not SGLang): the producer syncs the published version to its server from disk, publishes MoE groups with the
servers' routing traces, dead-letters a prompt the server refuses as longer than its context and goes on, and
a second server attached with `miles-stream sglang --attach` is synced and used."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from test_producer import addition_jsonl, collect, feed
from test_sglang import Standin, perturbed

from miles_stream.bus import BusConfig, Keys, StreamClient
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.schema import validate_group
from miles_stream.weights.transports import FileTransport
from miles_stream.weights.versions import WeightPublisher

CLI = [sys.executable, "-m", "miles_stream.cli"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("moe"), TinyModelConfig(kind="moe", max_position=1024))


@pytest.mark.process_tiers
async def test_a_producer_drives_sglang_servers_and_attaches_one_on_demand(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, redis_url: str,
    moe_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    flags = ("--model", str(moe_dir), "--enable-return-routed-experts", "--context-length", "64")
    first, second = Standin(*flags), Standin(*flags)
    producer = None
    try:
        publisher = WeightPublisher(redis, keys, FileTransport(tmp_path / "weights"))
        await publisher.publish(1, perturbed(moe_dir, seed=7))
        prompts = addition_jsonl(tmp_path / "p.jsonl", 6)
        with prompts.open("a") as f:  # 122 tokens: SGLang answers 400, longer than the context (64)
            f.write(json.dumps({"prompt": "12+" * 40 + "1=", "label": "0"}) + "\n")
        await feed(redis, keys, bus_config, prompts)
        config = {"bus": {"namespace": keys.namespace, "block_ms": 50},
                  "rollout": {"model": str(moe_dir), "engine": "sglang", "producer_id": "p1",
                              "n_samples_per_prompt": 2, "sampling": {"max_new_tokens": 4},
                              "sglang": {"urls": [first.url], "health_interval_s": 0.3}}}  # fmt: skip
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        common = ["--config", str(tmp_path / "run.yaml"), "--redis-url", redis_url]
        producer = await asyncio.to_thread(subprocess.Popen, [*CLI, "produce", *common], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True)  # fmt: skip
        got = await collect(redis, blocking, keys, bus_config, want=6)
        assert len(got) == 6
        for r in got:
            validate_group(r.group)
            for s in r.group.samples:
                assert s.routing is not None and s.routing.shape[1:] == (2, 2)  # both MoE layers, top-2
                assert s.version_spans.tolist() == [[0, 1]]  # synced from disk before the first prompt
        assert (await first.call("/standin/stats"))["version"] == "1"
        for _ in range(100):  # the long prompt is set aside with the server's reason, not the producer's end
            if await redis.xlen(keys.dead):
                break
            await asyncio.sleep(0.1)
        ((_, dead),) = await redis.xrange(keys.dead)
        assert dead[b"reason"].startswith(b"request: ") and b"than the model's context length" in dead[b"reason"]
        assert producer.poll() is None

        attach = await asyncio.to_thread(  # no --producer: p1 is the only live sglang producer
            subprocess.run,
            [*CLI, "sglang", "--attach", second.url, *common],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert attach.returncode == 0, attach.stderr
        assert sorted(attach.stdout.split()) == sorted(["p1", first.url, "p1", second.url])
        for _ in range(100):
            if (await second.call("/standin/stats"))["version"] == "1":
                break
            await asyncio.sleep(0.2)
        assert (await second.call("/standin/stats"))["version"] == "1"  # synced before it gets work
        more = FeederConfig(path=str(tmp_path / "p.jsonl"), num_epochs=3)  # the feeder resumes: 2 more epochs
        await Feeder(redis, keys, bus_config, more, load_rows(more)).run()
        assert len(await collect(redis, blocking, keys, bus_config, want=6)) >= 6
        assert (await second.call("/standin/stats"))["generate"] > 0
        producer.send_signal(signal.SIGTERM)
        assert producer.wait(timeout=60) == 0
        member_info = json.loads((await redis.hget(keys.member_info, "producer:p1")) or "{}")
        assert member_info == {}  # unregistered on exit
    finally:
        if producer is not None and producer.poll() is None:
            producer.kill()
            producer.wait()
        if producer is not None and producer.stderr is not None:
            producer.stderr.close()
        first.stop()
        second.stop()
