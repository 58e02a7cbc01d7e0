"""The native engine on tiny models: consistency with a teacher-forced pass, sampling parameters, continuous
batching, abort, pause, weight updates and version spans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.engines.native.sampling import sample_tokens, truncate
from miles_stream.errors import InvalidRequest
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.rollout import GenerationRequest, GenerationResult, SamplingParams
from miles_stream.schema import Sample, TrajectoryGroup, validate_group


@pytest.fixture(scope="module", params=["dense", "moe", "dense-static"])
def variant(request: pytest.FixtureRequest) -> str:
    """Model kind, and "-static" for the engine's static KV cache (the GPU path, here without CUDA graphs)."""
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(variant: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind = variant.split("-")[0]
    return build_tiny_model(tmp_path_factory.mktemp(kind), TinyModelConfig(kind=kind, max_position=1024))  # type: ignore[arg-type]


@pytest.fixture
async def engine(model_dir: Path, variant: str) -> AsyncIterator[NativeEngine]:
    kv_cache = "static" if variant.endswith("static") else "dynamic"
    eng = NativeEngine(str(model_dir), max_batch=3, seed=1, kv_cache=kv_cache, max_seq_len=1024)
    yield eng
    await eng.close()


def requests(n: int, params: SamplingParams) -> list[GenerationRequest]:
    return [GenerationRequest(request_id=f"r{i}", prompt_ids=list(range(5, 8 + i)), params=params) for i in range(n)]


def teacher_forced(
    model_dir: Path, prompt: list[int], result: GenerationResult, temperature: float
) -> tuple[torch.Tensor, np.ndarray | None]:
    """(logprobs of the response under log_softmax(logits / T), router top-k at every position run)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chosen: list[torch.Tensor] = []
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    hooks = [g.register_forward_hook(lambda mod, inp, out: chosen.append(out[2])) for g in gates]
    ids = torch.tensor([prompt + result.response_ids.tolist()])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0, len(prompt) - 1 :]
    for h in hooks:
        h.remove()
    response = torch.tensor(result.response_ids, dtype=torch.long)[:, None]
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1).gather(-1, response).squeeze(-1)
    routing = torch.stack(chosen, dim=1).numpy() if chosen else None
    return logp, routing


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=12, temperature=0.8),
                                    SamplingParams(max_new_tokens=12, temperature=1.3, top_k=5, top_p=0.7)],
                         ids=["plain", "top-k-top-p"])  # fmt: skip
async def test_logprobs_and_routing_equal_a_teacher_forced_pass(
    engine: NativeEngine, model_dir: Path, params: SamplingParams
) -> None:
    reqs = requests(7, params)  # 7 requests through 3 rows: rows join and leave while others decode
    results = await engine.generate(reqs)
    for req, res in zip(reqs, results, strict=True):
        logp, routing = teacher_forced(model_dir, list(req.prompt_ids), res, params.temperature)
        assert torch.allclose(logp, torch.from_numpy(res.logprobs), atol=1e-5), req.request_id  # float32
        if engine.num_experts:
            assert res.routing is not None and routing is not None
            assert res.routing.shape == (len(req.prompt_ids) + len(res.response_ids) - 1, 2, 2)
            assert (np.sort(res.routing, axis=-1) == np.sort(routing, axis=-1)).all()
        else:
            assert res.routing is None


async def test_results_make_valid_trajectory_groups(engine: NativeEngine) -> None:
    reqs = requests(3, SamplingParams(max_new_tokens=6))
    results = await engine.generate(reqs)
    group = TrajectoryGroup(
        group_id="g", prompt_key="p", producer_id="test", created_at=1.0,
        prompt_ids=np.asarray(reqs[0].prompt_ids, dtype=np.int32),
        samples=tuple(Sample(response_ids=r.response_ids, logprobs=r.logprobs,
                             loss_mask=np.ones(len(r.response_ids), np.uint8), version_spans=r.version_spans,
                             finish_reason=r.finish_reason, reward=0.0, routing=r.routing)
                      for r in await engine.generate([reqs[0]] * 2)),
    )  # fmt: skip
    validate_group(group)
    assert all(r.finish_reason in ("stop", "length") for r in results)


async def test_greedy_is_deterministic_and_is_the_argmax(engine: NativeEngine, model_dir: Path) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    first = await engine.generate(requests(2, params))
    again = await engine.generate(requests(2, params))
    for a, b in zip(first, again, strict=True):
        assert a.response_ids.tolist() == b.response_ids.tolist()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = list(requests(1, params)[0].prompt_ids)
    for _ in range(10):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert first[0].response_ids.tolist() == ids[3:]


async def test_stop_ids_stop_and_max_tokens_truncate(engine: NativeEngine) -> None:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    (free,) = await engine.generate(requests(1, greedy))
    assert free.finish_reason == "length" and len(free.response_ids) == 8
    stop_at = int(free.response_ids[3])
    first_hit = free.response_ids.tolist().index(stop_at)
    (stopped,) = await engine.generate(requests(1, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True,
                                                                  stop_token_ids=(stop_at,))))  # fmt: skip
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids.tolist() == free.response_ids[: first_hit + 1].tolist()  # stop token included


async def test_abort_returns_the_partial_output(engine: NativeEngine) -> None:
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    task = asyncio.create_task(engine.generate(requests(2, long)))
    await engine.pause()
    while not any(r.request.request_id == "r0" and r.tokens for r in engine._rows):  # a few tokens, then hold
        await engine.resume()
        await asyncio.sleep(0.001)
        await engine.pause()
    await engine.abort(["r0"])
    await engine.resume()
    results = await asyncio.wait_for(task, 30)
    assert results[0].finish_reason == "abort" and 0 < len(results[0].response_ids) < 200
    assert len(results[0].logprobs) == len(results[0].response_ids)
    assert results[1].finish_reason == "length"


async def test_pause_holds_generation_until_resume(engine: NativeEngine) -> None:
    await engine.pause()
    task = asyncio.create_task(engine.generate(requests(1, SamplingParams(max_new_tokens=4))))
    await asyncio.sleep(0.3)
    assert not task.done()
    await engine.resume()
    (res,) = await asyncio.wait_for(task, 10)
    assert len(res.response_ids) >= 1


async def test_weight_update_mid_generation_starts_a_new_version_span(engine: NativeEngine) -> None:
    name, param = next(iter(engine.model.named_parameters()))
    new = {name: param.detach().clone() + 0.01}
    task = asyncio.create_task(engine.generate(requests(1, SamplingParams(max_new_tokens=300, ignore_eos=True))))
    await engine.pause()
    while not engine._rows or len(engine._rows[0].tokens) < 5:  # some tokens made, then the engine held still
        await engine.resume()
        await asyncio.sleep(0.001)
        await engine.pause()
    update = asyncio.create_task(engine.update_weights(1, new))
    await engine.resume()
    await update
    (res,) = await asyncio.wait_for(task, 60)
    spans = res.version_spans.tolist()
    assert spans[0] == [0, 0] and spans[-1][1] == 1 and 0 < spans[-1][0] < 300
    assert engine.weight_version == 1
    assert torch.equal(dict(engine.model.named_parameters())[name], new[name])
    (after,) = await engine.generate(requests(1, SamplingParams(max_new_tokens=3)))
    assert after.version_spans.tolist() == [[0, 1]]


async def test_update_with_an_unknown_parameter_fails_and_changes_nothing(engine: NativeEngine) -> None:
    with pytest.raises(Exception, match="unknown parameter 'nope'"):
        await engine.update_weights(5, {"nope": torch.zeros(1)})
    assert engine.weight_version == 0


async def test_waiters_that_gave_up_do_not_stop_the_engine(engine: NativeEngine) -> None:
    """A producer stopping cancels what it waits for (a generation, a weight update); the engine thread then
    set a result on a cancelled future, raised InvalidStateError and died with a traceback."""
    from concurrent.futures import Future

    await engine.pause()
    for future in [engine.submit(r) for r in requests(2, SamplingParams(max_new_tokens=4))]:
        future.cancel()  # what cancelling asyncio.wrap_future(...) does to it
    gave_up: Future[None] = Future()
    gave_up.cancel()
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    engine._updates.put((3, state, gave_up))  # as update_weights() hands it over, its waiter already gone
    await engine.resume()
    (after,) = await asyncio.wait_for(engine.generate(requests(1, SamplingParams(max_new_tokens=3))), 60)
    assert after.finish_reason == "length" and engine.weight_version == 3  # applied, and the thread lives on


def test_truncation_keeps_top_k_and_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda k, p: torch.isfinite(truncate(logits, torch.tensor([k]), torch.tensor([p])))[0].tolist()  # noqa: E731
    assert kept(0, 1.0) == [True, True, True, True]
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(0, 0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert kept(0, 0.5) == [True, False, False, False]
    assert kept(0, 0.01) == [True, False, False, False]  # at least one token


def test_sampled_logprob_is_before_truncation_and_greedy_scores_at_t1() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    g = torch.Generator().manual_seed(0)
    tokens, logp = sample_tokens(logits, torch.tensor([0.5, 0.0]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]), g)
    assert tokens.tolist() == [0, 3]
    expected0 = torch.log_softmax(logits[0] / 0.5, -1)[0]  # top-k=1 leaves one token, yet its logprob is < 0
    assert logp[0].item() == pytest.approx(expected0.item()) and logp[0].item() < -1e-3
    assert logp[1].item() == pytest.approx(float(np.log(0.4)), rel=1e-5)


async def test_a_closed_engine_refuses_work(model_dir: Path) -> None:
    eng = NativeEngine(str(model_dir))
    await eng.close()
    with pytest.raises(Exception, match="closed"):
        eng.submit(requests(1, SamplingParams())[0])


async def test_a_single_token_budget_gives_exactly_one_token(engine: NativeEngine) -> None:
    reqs = requests(2, SamplingParams(max_new_tokens=1, ignore_eos=True))
    for req, res in zip(reqs, await engine.generate(reqs), strict=True):
        assert res.finish_reason == "length" and len(res.response_ids) == 1
        if res.routing is not None:
            assert res.routing.shape[0] == len(req.prompt_ids)


async def test_requests_the_model_cannot_run_are_refused_and_the_engine_keeps_serving(engine: NativeEngine) -> None:
    bad = [
        GenerationRequest(request_id="empty", prompt_ids=[]),
        GenerationRequest(request_id="vocab", prompt_ids=[5, 10_000]),
        GenerationRequest(request_id="long", prompt_ids=[5], params=SamplingParams(max_new_tokens=5000)),
    ]
    for req, message in zip(bad, ["empty prompt", "outside", "exceed the model's 1024 positions"], strict=True):
        with pytest.raises(InvalidRequest, match=message):
            await engine.generate([req])
    (ok,) = await asyncio.wait_for(engine.generate(requests(1, SamplingParams(max_new_tokens=3))), 10)
    assert len(ok.response_ids) >= 1


async def test_an_update_with_one_bad_tensor_changes_nothing(engine: NativeEngine) -> None:
    name, param = next(iter(engine.model.named_parameters()))
    before = param.detach().clone()
    # a good tensor first, then a bad one: the good one must not have been copied either
    for update in ({name: before + 1.0, "nope": torch.zeros(1)}, {name: torch.zeros(3)}):
        with pytest.raises(Exception, match=r"unknown parameter|has shape"):
            await engine.update_weights(9, update)
    assert torch.equal(dict(engine.model.named_parameters())[name], before)
    assert engine.weight_version == 0
