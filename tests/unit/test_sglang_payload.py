"""The `/generate` payload and reply as the SGLang spec has them: ids and allowed sampling keys out; tokens,
logprobs, finish reasons, version spans and the base64 routing trace (with its element count) in."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from miles_stream.engines.base import GenerationRequest, SamplingParams
from miles_stream.engines.sglang.payload import (
    SAMPLING_KEYS,
    MoeLayout,
    ResponseError,
    generate_payload,
    parse_generate,
)

GREEDY = SamplingParams(temperature=0.0, top_k=0, max_new_tokens=4, stop_token_ids=(9,))
REQUEST = GenerationRequest(request_id="grp", prompt_ids=[5, 6, 7], params=GREEDY)
LAYOUT = MoeLayout(num_layers=3, top_k=2, num_experts=8, moe_layers=(1, 2))  # layer 0 dense


def reply(tokens: list[int], finish: dict[str, object], **meta: object) -> dict[str, object]:
    triples = [[-0.5 * (i + 1), t, None] for i, t in enumerate(tokens)]
    meta_info = {"id": "grp/0", "finish_reason": finish, "output_token_logprobs": triples, **meta}
    return {"text": "", "output_ids": tokens, "meta_info": meta_info}


def trace(rows: int, layers: int = 3, k: int = 2) -> str:
    ids = (np.arange(rows * layers * k) % 8).astype("<i4")
    return base64.b64encode(ids.tobytes()).decode()


def test_payload_sends_ids_and_only_keys_sglang_accepts() -> None:
    p = generate_payload(REQUEST, "grp/0", routing=True)
    assert p["input_ids"] == [5, 6, 7] and p["rid"] == "grp/0" and p["return_logprob"] and p["return_routed_experts"]
    sp = p["sampling_params"]
    assert sp.keys() <= SAMPLING_KEYS
    assert sp["top_k"] == -1 and sp["temperature"] == 0.0 and sp["stop_token_ids"] == [9] and sp["no_stop_trim"]
    assert "return_routed_experts" not in generate_payload(REQUEST, "r", routing=False)


def test_reply_gives_tokens_logprobs_finish_and_spans() -> None:
    spans = [{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 2}]
    body = reply([3, 9], {"type": "stop", "matched": 9}, weight_version="4", weight_versions=spans)
    r = parse_generate(body, REQUEST, default_version=0)
    assert r.response_ids.tolist() == [3, 9] and r.response_ids.dtype == np.int32
    np.testing.assert_allclose(r.logprobs, [-0.5, -1.0])
    assert r.finish_reason == "stop" and r.version_spans.tolist() == [[0, 3], [1, 4]]
    length = parse_generate(reply([1], {"type": "length", "length": 1}, weight_version="default"), REQUEST,
                            default_version=7)  # fmt: skip
    assert length.finish_reason == "length" and length.version_spans.tolist() == [[0, 7]]


def test_an_abort_is_a_partial_even_before_any_token() -> None:
    r = parse_generate(reply([], {"type": "abort", "message": "x", "status_code": None}, routed_experts=""),
                       REQUEST, default_version=2, layout=LAYOUT)  # fmt: skip
    assert r.finish_reason == "abort" and len(r.response_ids) == 0 and r.routing is None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"text": "x"}, "meta_info"),
        (reply([1], {"type": "weird"}), "finish_reason"),
        (reply([1], {"type": "stop"}, weight_version="v1"), "not one of ours"),
        ({**reply([1], {"type": "stop"}), "output_ids": [2]}, "disagree"),
        (reply([1], {"type": "stop"}, output_token_logprobs=[[0.1]]), "malformed"),
    ],
)
def test_malformed_replies_are_refused(body: dict[str, object], match: str) -> None:
    with pytest.raises(ResponseError, match=match):
        parse_generate(body, REQUEST, default_version=0)


def test_routing_keeps_the_moe_layers_and_checks_the_element_count() -> None:
    rows = 3 + 2 - 1  # prompt + response - 1: the last token never ran forward
    r = parse_generate(reply([1, 2], {"type": "length", "length": 2}, routed_experts=trace(rows)), REQUEST,
                       default_version=0, layout=LAYOUT)  # fmt: skip
    full = (np.arange(rows * 3 * 2) % 8).reshape(rows, 3, 2)
    assert r.routing is not None and r.routing.dtype == np.uint8
    np.testing.assert_array_equal(r.routing, full[:, 1:])
    for bad, match in ((trace(rows + 1), "bytes"), ("!!", "base64"), (trace(rows, k=3), "bytes")):
        with pytest.raises(ResponseError, match=match):
            parse_generate(reply([1, 2], {"type": "length"}, routed_experts=bad), REQUEST, default_version=0,
                           layout=LAYOUT)  # fmt: skip
    out_of_range = base64.b64encode(np.full(rows * 6, 8, "<i4").tobytes()).decode()
    with pytest.raises(ResponseError, match="outside"):
        parse_generate(reply([1, 2], {"type": "length"}, routed_experts=out_of_range), REQUEST, default_version=0,
                       layout=LAYOUT)  # fmt: skip
    with pytest.raises(ResponseError, match="not known to be MoE"):
        parse_generate(reply([1, 2], {"type": "length"}, routed_experts=trace(rows)), REQUEST, default_version=0)
