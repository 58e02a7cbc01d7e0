"""What goes over the wire to SGLang's `/generate` and what comes back, as pure functions.

The request carries token ids (never text) and only sampling keys SGLang accepts (0.5.23 answers 400 to an
unknown one: sglang/api/v1/api_types.py:177-178, srt/entrypoints/http_server.py:933-940). The response's
`meta_info.output_token_logprobs` items are [logprob, token id, text or null], one per output token including
a final stop token; the tokens are taken from there, never re-tokenised.
`finish_reason.type` stop / length / abort maps to ours; an abort is a partial the producer can resume.
Versions are strings on the wire ("default" before any update, our integers after); `weight_versions`
(0.5.23) gives spans over output tokens when a request outlived an update, else `weight_version` covers all.

`routed_experts`: base64 of little-endian int32, C order, [prompt + completion - 1 - start, layers, top-k];
every layer of the model is there (dense layers as zeros), so the MoE layers are picked out by index.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
from torch.multiprocessing import reductions

from miles_stream.engines.base import GenerationRequest, GenerationResult, merge_spans
from miles_stream.engines.http import ResponseError, parse_version
from miles_stream.schema import FinishReason, make_spans

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
                           "stop_regex", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                           "no_stop_trim", "n", "min_new_tokens", "frequency_penalty", "presence_penalty",
                           "repetition_penalty", "logit_bias", "sampling_seed", "custom_params", "json_schema",
                           "regex", "ebnf"})  # fmt: skip


def generate_payload(request: GenerationRequest, rid: str, *, routing: bool) -> dict[str, Any]:
    p = request.params
    sampling: dict[str, Any] = {
        "max_new_tokens": p.max_new_tokens,
        "temperature": float(p.temperature),  # 0: greedy, as ours
        "top_p": float(p.top_p),
        "top_k": p.top_k if p.top_k > 0 else -1,  # ours 0 = off; SGLang takes -1 (its default 2^30) as off
        "stop_token_ids": [int(t) for t in p.stop_token_ids],
        "ignore_eos": p.ignore_eos,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "no_stop_trim": True,
    }
    assert sampling.keys() <= SAMPLING_KEYS
    payload: dict[str, Any] = {"rid": rid, "input_ids": [int(t) for t in request.prompt_ids],
                               "sampling_params": sampling, "return_logprob": True}  # fmt: skip
    if routing:
        payload["return_routed_experts"] = True
    return payload


def parse_generate(
    body: Any,
    request: GenerationRequest,
    *,
    default_version: int,
    layout: MoeLayout | None = None,
) -> GenerationResult:
    """The reply to one non-streamed `/generate` as a `GenerationResult`; `layout` (MoE models) shapes the
    routing trace, which is refused when it comes without one."""
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise ResponseError(f"{request.request_id}: reply has no meta_info: {str(body)[:200]}")
    meta = body["meta_info"]
    finish = _finish_reason(meta.get("finish_reason"), request.request_id)
    items = meta.get("output_token_logprobs") or []
    try:
        tokens = np.asarray([int(item[1]) for item in items], np.int32)
        logprobs = np.asarray([float(item[0]) for item in items], np.float32)
    except (TypeError, ValueError, IndexError) as exc:
        raise ResponseError(f"{request.request_id}: malformed output_token_logprobs: {exc}") from exc
    output_ids = body.get("output_ids")
    if output_ids is not None and [int(t) for t in output_ids] != tokens.tolist():
        raise ResponseError(f"{request.request_id}: output_ids and output_token_logprobs disagree")
    spans = version_spans(meta, len(tokens), default_version)
    routing = None
    if meta.get("routed_experts") is not None and len(tokens):  # an abort before any token: nothing ran
        if layout is None:
            raise ResponseError(f"{request.request_id}: a routing trace came for a model not known to be MoE")
        routing = decode_routing(meta["routed_experts"], len(request.prompt_ids) + len(tokens) - 1, layout)
    return GenerationResult(request_id=request.request_id, response_ids=tokens, logprobs=logprobs,
                            finish_reason=finish, version_spans=spans, routing=routing)  # fmt: skip


def _finish_reason(raw: Any, rid: str) -> FinishReason:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in _FINISH:
        raise ResponseError(f"{rid}: unknown finish_reason {raw!r}")
    return _FINISH[kind]


def version_spans(meta: dict[str, Any], num_tokens: int, default_version: int) -> np.ndarray:
    spans = meta.get("weight_versions")
    if spans:
        marks = [(int(s["start"]), parse_version(s["version"], default_version)) for s in spans]
    else:
        marks = [(0, parse_version(meta.get("weight_version"), default_version))]
    return make_spans(merge_spans(marks, max(num_tokens, 1)))


def decode_routing(encoded: Any, rows: int, layout: MoeLayout) -> np.ndarray:
    """[rows, MoE layers, top-k] expert ids from SGLang's base64 int32 [rows, all layers, top-k]; the element
    count must be exactly rows x layers x top-k."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ResponseError(f"routed_experts is not base64: {exc}") from exc
    expected = rows * layout.num_layers * layout.top_k * 4
    if rows < 1 or len(raw) != expected:
        raise ResponseError(f"routed_experts holds {len(raw)} bytes; {rows} positions x {layout.num_layers} "
                            f"layers x top-{layout.top_k} int32 are {expected}")  # fmt: skip
    trace = np.frombuffer(raw, dtype="<i4").reshape(rows, layout.num_layers, layout.top_k)[:, list(layout.moe_layers)]
    if trace.size and (trace.min() < 0 or trace.max() >= layout.num_experts):
        raise ResponseError(f"routed_experts has expert ids outside [0, {layout.num_experts})")
    return trace.astype(np.uint8 if layout.num_experts <= 256 else np.uint16)


@dataclass(frozen=True, slots=True)
class MoeLayout:
    """How a model's routing trace is laid out: SGLang sends every layer, we keep the MoE ones (the layers
    whose routers the trainer replays, in order)."""

    num_layers: int
    top_k: int
    num_experts: int
    moe_layers: tuple[int, ...]


def serialize_for_rank(named: list[tuple[str, torch.Tensor]]) -> str:
    """One TP rank's entry of `/update_weights_from_tensor`: the (name, tensor) list pickled with torch's
    multiprocessing reducers (a CUDA tensor becomes an IPC handle, not data), base64 text for JSON.

    SGLang's side (sglang/srt/managers/tp_worker.py:194-201) patches torch's CUDA rebuild and reads argument 6,
    the device, as a GPU UUID, or as its own ordinal when it is an int (utils/patch_torch.py:80-99): a bare
    ordinal from us would name whichever GPU has that number in the server's CUDA_VISIBLE_DEVICES. So the device
    goes by UUID, as SGLang's own senders write it (patch_torch.py:72-86). The rebuild function keeps torch's
    name, which the server's allow-list admits (utils/common.py:3329) and its patch resolves."""
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    pickler.dispatch_table[torch.Tensor] = _reduce_by_uuid
    pickler.dispatch_table[torch.nn.Parameter] = _reduce_by_uuid
    pickler.dump(named)
    return base64.b64encode(buffer.getvalue()).decode()


_DEVICE_ARG = 6  # reduce_tensor's argument for the device (torch/multiprocessing/reductions.py; patch_torch.py:64)


def _reduce_by_uuid(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    rebuild, args = reductions.reduce_tensor(tensor)  # type: ignore[no-untyped-call]
    if tensor.is_cuda:
        args = (*args[:_DEVICE_ARG], gpu_uuid(int(args[_DEVICE_ARG])), *args[_DEVICE_ARG + 1 :])
    return rebuild, args


def gpu_uuid(ordinal: int) -> str:
    return str(torch.cuda.get_device_properties(ordinal).uuid)
