"""The `/generate` payload and reply as SGLang 0.5.23 has them: ids and allowed sampling keys out; tokens,
logprobs, finish reasons, version spans and the base64 routing trace (with its element count) in; a TP rank's
`update_weights_from_tensor` entry (allow-listed globals, the GPU by UUID); the /server_info checks."""

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
    serialize_for_rank,
)
from miles_stream.engines.sglang.server_info import Unsuitable, check_server

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


def test_a_tp_ranks_entry_is_a_pickle_sglangs_allow_list_admits() -> None:
    """SGLang's SafeUnpickler admits only listed globals (utils/common.py:3144-3345); on CPU the entry names
    torch's rebuild functions, each on that list, and comes back whole."""
    import pickletools

    import torch

    strategy = torch.multiprocessing.get_sharing_strategy()  # type: ignore[no-untyped-call]
    torch.multiprocessing.set_sharing_strategy("file_system")  # type: ignore[no-untyped-call]  # a file name
    try:
        entry = serialize_for_rank([("w", torch.arange(6.0).reshape(2, 3))])
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)  # type: ignore[no-untyped-call]
    raw = base64.b64decode(entry)
    strings = [arg for op, arg, _ in pickletools.genops(raw) if op.name.endswith("UNICODE")]
    assert "torch.multiprocessing.reductions" in strings and "rebuild_tensor" in strings
    allowed = {"rebuild_tensor", "rebuild_cuda_tensor", "rebuild_storage_filename", "rebuild_typed_storage"}
    assert {s for s in strings if s.startswith("rebuild")} <= allowed


def test_a_cuda_tensor_is_sent_with_its_gpus_uuid_not_an_ordinal(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang reads argument 6 of torch's CUDA rebuild as a UUID, or as its own ordinal when it is an int
    (utils/patch_torch.py:80-99); we send the UUID, as its senders do (patch_torch.py:72-86)."""
    from torch.multiprocessing import reductions

    from miles_stream.engines.sglang import payload

    class FakeCuda:
        is_cuda = True

    args = ("cls", (2,), (1,), 0, "storage", "dtype", 3, b"handle", 8, 0, False, b"ref", 0, b"event", True)
    monkeypatch.setattr(reductions, "reduce_tensor", lambda t: (reductions.rebuild_cuda_tensor, args))
    monkeypatch.setattr(payload, "gpu_uuid", lambda ordinal: f"GPU-uuid-of-{ordinal}")
    rebuild, sent = payload._reduce_by_uuid(FakeCuda())  # type: ignore[arg-type]
    assert rebuild is reductions.rebuild_cuda_tensor  # pickled by torch's name: on SGLang's allow-list
    assert sent[6] == "GPU-uuid-of-3" and sent[:6] == args[:6] and sent[7:] == args[7:]


def test_server_info_is_checked_for_what_the_run_needs() -> None:
    ok = {"tp_size": 2, "dp_size": 1, "pp_size": 1, "enable_return_routed_experts": True}
    check_server("u", ok, routing=True, weight_sync="distributed", tensor_ranks=1)
    check_server("u", {**ok, "dp_size": 4, "pp_size": 2}, routing=False, weight_sync="disk", tensor_ranks=1)
    for info, kw, match in (
        ({**ok, "enable_return_routed_experts": False}, {"weight_sync": "disk"}, "--enable-return-routed-experts"),
        ({**ok, "dp_size": 2}, {"weight_sync": "distributed"}, "dp_size 2, pp_size 1"),
        ({**ok, "pp_size": 2}, {"weight_sync": "tensor"}, "dp_size 1, pp_size 2"),
        (ok, {"weight_sync": "tensor"}, "tp_size 2"),
    ):
        with pytest.raises(Unsuitable, match=match):
            check_server("u", info, routing=True, tensor_ranks=1, **kw)  # type: ignore[arg-type]
