"""`SGLangEngine` against stand-in SGLang servers (tests/sglang_standin.py: our native engine behind the HTTP
behaviour read in SGLang 0.5.23's source; no real SGLang runs here): generation, abort and resume, the weight
update sequence over disk / distributed (gloo) / tensor, a failed and a hung update, attach and detach through
a stand-in router, a failing server taken out and brought back. Failures, recovery, weight groups, keys and
attach checks: test_sglang_recovery.py."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from miles_stream.engines.base import GenerationRequest, SamplingParams
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.engines.sglang.client import SGLangClient, SGLangError
from miles_stream.engines.sglang.config import SGLangConfig
from miles_stream.engines.sglang.engine import SGLangEngine, make_push, moe_layout
from miles_stream.engines.sglang.updates import WeightUpdateError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.rollout.turns import single_turn
from miles_stream.weights.manifest import WeightManifest
from miles_stream.weights.transports import FileTransport

STANDIN = Path(__file__).parent.parent / "sglang_standin.py"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Standin:
    def __init__(self, *args: str, health_timeout_s: float = 20.0, key: str = "") -> None:
        self.port, self.key = free_port(), key
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent.parent),
               "SGLANG_HEALTH_CHECK_TIMEOUT": str(health_timeout_s)}  # fmt: skip  # read as SGLang reads it
        self.proc = subprocess.Popen([sys.executable, str(STANDIN), "--port", str(self.port), *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        seen = []
        while not (line := self.proc.stdout.readline()).startswith("ready"):  # after the loading progress bars
            seen.append(line)
            if not line:
                self.stop()
                raise AssertionError(f"the stand-in did not start: {''.join(seen)[-2000:]}")
        self.url = f"http://127.0.0.1:{self.port}"

    async def call(self, path: str, body: Any = None) -> Any:
        client = SGLangClient(self.url, api_key=self.key)
        try:
            return await client.request("POST" if body is not None else "GET", path, body)
        finally:
            await client.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dense"), TinyModelConfig(kind="dense", max_position=1024))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("moe"), TinyModelConfig(kind="moe", max_position=1024))


@pytest.fixture
def servers(dense_dir: Path) -> Iterator[list[Standin]]:
    started = [Standin("--model", str(dense_dir)) for _ in range(2)]
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def router() -> Iterator[Standin]:
    r = Standin("--router")
    yield r
    r.stop()


@pytest.fixture
async def native(dense_dir: Path) -> AsyncIterator[NativeEngine]:
    engine = NativeEngine(str(dense_dir), max_batch=8)
    yield engine
    await engine.close()


def config(*urls: str, **kw: Any) -> SGLangConfig:
    return SGLangConfig(**{"urls": urls, "health_interval_s": 0.2, "update_timeout_s": 30, **kw})


def requests(n: int, params: SamplingParams = GREEDY) -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"g{i}", prompt_ids=[1 + i, 5, 7, 2], params=params) for i in range(n)]


def perturbed(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied weights once: every name of a tied tensor gets the same values
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


async def publish(tmp_path: Path, version: int, state: dict[str, torch.Tensor]) -> WeightManifest:
    return await FileTransport(tmp_path / "weights").write(version, state)


async def test_generation_carries_the_engine_tokens_logprobs_and_versions(servers: list[Standin],
                                                                          native: NativeEngine) -> None:  # fmt: skip
    engine = SGLangEngine(config(servers[0].url))
    await engine.start()
    try:
        got = await engine.generate(requests(3))
    finally:
        await engine.close()
    want = await native.generate(requests(3))
    for g, w in zip(got, want, strict=True):
        assert g.response_ids.tolist() == w.response_ids.tolist() and len(g.response_ids) == 12
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        assert g.finish_reason == "length" and g.version_spans.tolist() == [[0, 0]]  # "default" = version 0
    assert g.routing is None


async def test_the_spec_schema_gate_refuses_unknown_sampling_keys_and_ours_pass_it(servers: list[Standin]) -> None:
    with pytest.raises(SGLangError, match="unknown field `top_n`, expected one of") as info:
        await servers[0].call("/generate", {"input_ids": [1, 2], "sampling_params": {"top_n": 3}})
    assert info.value.status == 400
    with pytest.raises(SGLangError, match=r"invalid type: floating point `2.0`, expected i64"):
        await servers[0].call("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2.0}})
    engine = SGLangEngine(config(servers[0].url))
    await engine.start()
    try:  # top_k 0 (ours: off) goes out as -1, a stop id as a list of ints
        params = SamplingParams(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=3, stop_token_ids=(4,))
        (result,) = await engine.generate(requests(1, params))
        assert 1 <= len(result.response_ids) <= 3
    finally:
        await engine.close()


async def test_an_aborted_sample_comes_back_partial_and_resumes_to_its_budget(servers: list[Standin]) -> None:
    engine = SGLangEngine(config(servers[0].url))
    await engine.start()
    params = SamplingParams(temperature=1.0, max_new_tokens=900, ignore_eos=True)
    try:
        task = asyncio.create_task(single_turn(engine, [3, 4, 5], params, "grp"))
        deadline = time.monotonic() + 30
        while not (await servers[0].call("/standin/stats"))["tokens_in_flight"]:  # decoding, not yet done
            assert time.monotonic() < deadline, "the stand-in never started decoding"
            await asyncio.sleep(0.01)
        # paused in place, the abort lands between two decode steps (~900 tokens of margin before the budget)
        await servers[0].call("/pause_generation", {"mode": "in_place"})
        await engine.abort(["grp"])
        await servers[0].call("/continue_generation", {})
        partial = await task
        assert partial.finish_reason == "abort" and 0 < len(partial) < 900
        done = await single_turn(engine, [3, 4, 5], params, "grp", prefix=partial)
        assert done.finish_reason == "length" and len(done) == 900
        assert done.response_ids[: len(partial)].tolist() == partial.response_ids.tolist()
    finally:
        await engine.close()


async def test_moe_routing_is_decoded_to_the_native_engines_trace(moe_dir: Path) -> None:
    server = Standin("--model", str(moe_dir), "--enable-return-routed-experts")
    native = NativeEngine(str(moe_dir), max_batch=8)
    layout = moe_layout(str(moe_dir))
    assert layout is not None and layout.moe_layers == (0, 1) and layout.top_k == 2
    engine = SGLangEngine(config(server.url), layout=layout)
    try:
        await engine.start()
        (got,) = await engine.generate(requests(1))
        (want,) = await native.generate(requests(1))
        assert got.routing is not None and want.routing is not None
        assert got.routing.shape == (4 + 12 - 1, 2, 2) and got.routing.dtype == np.uint8
        np.testing.assert_array_equal(got.routing, want.routing)
    finally:
        await engine.close()
        await native.close()
        server.stop()


async def test_disk_update_follows_the_sequence_and_changes_the_weights(
    servers: list[Standin], native: NativeEngine, dense_dir: Path, tmp_path: Path
) -> None:
    state = perturbed(dense_dir, seed=1)
    manifest = await publish(tmp_path, 1, state)
    engine = SGLangEngine(config(servers[0].url))
    await engine.start()
    try:
        await engine.apply_manifest(manifest, _no_state)
        assert engine.weight_version == 1
        stats = await servers[0].call("/standin/stats")
        calls = [c for c in stats["calls"] if not c.startswith(("/health", "/standin", "/generate"))]
        assert calls[-5:] == ["/pause_generation", "/flush_cache", "/update_weights_from_disk", "/model_info",
                              "/continue_generation"]  # fmt: skip
        assert stats["version"] == "1" and not stats["paused"]
        (got,) = await engine.generate(requests(1))
        await native.update_weights(1, state)
        (want,) = await native.generate(requests(1))
        assert got.response_ids.tolist() == want.response_ids.tolist()
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert got.version_spans.tolist() == [[0, 1]]
    finally:
        await engine.close()


async def _no_state() -> dict[str, torch.Tensor]:
    raise AssertionError("the disk push must not load tensors in this process")


@pytest.mark.parametrize("sync", ["distributed", "tensor"])
async def test_distributed_and_tensor_updates_reach_every_server(
    servers: list[Standin], native: NativeEngine, dense_dir: Path, tmp_path: Path, sync: str
) -> None:
    state = perturbed(dense_dir, seed=2)
    manifest = await publish(tmp_path, 3, state)

    async def load() -> dict[str, torch.Tensor]:
        return state

    cfg = config(*(s.url for s in servers), weight_sync=sync, sync_backend="gloo", sync_device="cpu",
                 sync_master_port=free_port())  # fmt: skip
    strategy = torch.multiprocessing.get_sharing_strategy()  # type: ignore[no-untyped-call]
    if sync == "tensor":  # CPU handles must name shared-memory files: the default passes file descriptors, which
        # only a multiprocessing child can receive (on a GPU the handles are CUDA IPC handles)
        torch.multiprocessing.set_sharing_strategy("file_system")  # type: ignore[no-untyped-call]
    push = make_push(cfg)
    push.bucket_bytes = 16 << 10  # type: ignore[attr-defined]  # the tiny model in several buckets
    engine = SGLangEngine(cfg, push=push)
    await engine.start()
    try:
        await engine.apply_manifest(manifest, load)
        await native.update_weights(3, state)
        (want,) = await native.generate(requests(1))
        for s in servers:
            stats = await s.call("/standin/stats")
            assert stats["version"] == "3" and not stats["session"] and not stats["paused"]
            calls = [c for c in stats["calls"] if c.startswith("/update") or c.endswith("weight_update")]
            assert calls[0] == "/begin_weight_update" and calls[-2:] == ["/end_weight_update",
                                                                         "/update_weight_version"]  # fmt: skip
            assert len(calls) > 4 and len(stats["loaded"]) > 2  # several buckets of at most 16 KiB
        for _ in range(4):  # spread over both servers
            (got,) = await engine.generate(requests(1))
            assert got.response_ids.tolist() == want.response_ids.tolist()
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    finally:
        await engine.close()
        torch.multiprocessing.set_sharing_strategy(strategy)  # type: ignore[no-untyped-call]


async def test_a_failed_disk_update_is_raised_and_the_rolled_back_server_comes_back(
    servers: list[Standin], dense_dir: Path, tmp_path: Path
) -> None:
    manifest = await publish(tmp_path, 1, perturbed(dense_dir, seed=3))
    engine = SGLangEngine(dataclasses.replace(config(servers[0].url), health_interval_s=60))
    await engine.start()
    try:
        await servers[0].call("/standin/faults", {"fail_next_update": True})
        with pytest.raises(WeightUpdateError, match="Rolling back to original weights"):
            await engine.apply_manifest(manifest, _no_state)
        stats = await servers[0].call("/standin/stats")
        assert stats["paused"] and stats["version"] == "default"  # not resumed by the update that failed
        assert engine.weight_version == 0 and engine.servers == {servers[0].url: False}
        assert "/continue_generation" not in stats["calls"]
        await engine.recover()  # what the health loop does every health_interval_s
        assert engine.servers == {servers[0].url: True}
        stats = await servers[0].call("/standin/stats")  # resumed (a paused server never passes the probe),
        assert not stats["paused"] and stats["version"] == "default"  # SGLang rolled its disk load back
        (result,) = await engine.generate(requests(1))
        assert result.version_spans.tolist() == [[0, 0]]
    finally:
        await engine.close()


async def test_a_hung_update_times_out(servers: list[Standin], dense_dir: Path, tmp_path: Path) -> None:
    manifest = await publish(tmp_path, 1, perturbed(dense_dir, seed=4))
    engine = SGLangEngine(dataclasses.replace(config(servers[0].url), update_timeout_s=1.0))
    await engine.start()
    try:
        await servers[0].call("/standin/faults", {"hang_update_s": 6})
        started = asyncio.get_running_loop().time()
        with pytest.raises(WeightUpdateError, match="timed out"):
            await engine.apply_manifest(manifest, _no_state)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await engine.close()


async def test_attach_syncs_and_registers_a_new_server_and_detach_drains_one(
    servers: list[Standin], router: Standin, dense_dir: Path, tmp_path: Path
) -> None:
    first, second = servers
    engine = SGLangEngine(config(first.url, router_url=router.url))
    await engine.start()
    try:
        manifest = await publish(tmp_path, 1, perturbed(dense_dir, seed=5))
        await engine.apply_manifest(manifest, _no_state)
        await engine.attach(second.url)  # started at "default": synced to version 1 before it gets work
        assert (await second.call("/standin/stats"))["version"] == "1"
        workers = (await router.call("/workers"))["workers"]
        assert [w["url"] for w in workers] == [first.url, second.url]
        results = await engine.generate(requests(6))
        assert all(r.version_spans.tolist() == [[0, 1]] for r in results)
        assert (await second.call("/standin/stats"))["generate"] > 0  # the router sent it work
        long = SamplingParams(temperature=1.0, max_new_tokens=300, ignore_eos=True)
        running = asyncio.create_task(engine.generate(requests(2, long)))
        await asyncio.sleep(0.5)
        await engine.detach(first.url, grace_s=0.5)  # what it still has is aborted, to be resumed elsewhere
        assert [w["url"] for w in (await router.call("/workers"))["workers"]] == [second.url]
        finished = await running
        assert {r.finish_reason for r in finished} <= {"abort", "length"}
        assert engine.servers == {second.url: True}
    finally:
        await engine.close()


async def test_a_failing_server_is_taken_out_and_brought_back(servers: list[Standin]) -> None:
    first, second = servers
    engine = SGLangEngine(config(first.url, second.url))
    await engine.start()
    try:
        await first.call("/standin/faults", {"fail_generates": 1})
        await second.call("/standin/faults", {"fail_generates": 1})
        results = await engine.generate(requests(4))  # each failed request is retried on the other server
        assert all(len(r.response_ids) == 12 for r in results)
        for _ in range(50):
            if all(engine.servers.values()):
                break
            await asyncio.sleep(0.1)
        assert all(engine.servers.values())  # the health loop brought them back
    finally:
        await engine.close()
