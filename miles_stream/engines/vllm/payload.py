"""What goes over the wire to vLLM's `/inference/v1/generate` and what comes back, as pure functions.

The request carries token ids and vLLM's `SamplingParams` fields (vllm/sampling_params.py:268-375);
`logprobs: 0` asks for the sampled token's logprob only; `n` samples of the same prompt go as one request
(vLLM's parallel sampling: n child requests, copies of ours with its external id, v1/engine/async_llm.py:
533-547, whose outputs are gathered by their index, parallel_sampling.py:124, into one reply with a choice
each, scale_out/token_in_token_out/serving.py:410-464; every child is filed under the external id,
output_processor.py:645, so an abort of our id aborts them all, :580-582; n may not exceed the server's
max_num_seqs, serving.py:203-208). Each choice has `index`, `token_ids`,
`logprobs.content[i].logprob` per token, `finish_reason` (stop / length / abort) and `weight_versions`, spans
`{version, start, end}` over output tokens (vllm/outputs.py:42-47; "default" before any version is set).
A logprob vLLM did not have comes as the sentinel -9999.0 (scale_out/token_in_token_out/serving.py:789-794):
refused here, never trained on.

Logprobs: ours are log_softmax(logits / temperature) of the sampled token before top-k / top-p
(engines/base.py). vLLM's server-wide `--logprobs-mode` gives either `raw_logprobs` (default: log_softmax of the
logits before temperature and any truncation, v1/sample/sampler.py:84-88) or `processed_logprobs` (after
temperature AND top-k / top-p, v1/sample/ops/topk_topp_sampler.py:276-279). Each matches ours only in part:
raw where temperature is 1 (or 0: greedy is scored at temperature 1), processed where top-k and top-p are off
(greedy rows keep temperature 1 there too, sampler.py:237-238). `logprob_convention` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from miles_stream.engines.base import GenerationRequest, GenerationResult, SamplingParams, merge_spans
from miles_stream.engines.http import ResponseError, parse_version
from miles_stream.errors import ConfigError
from miles_stream.schema import FinishReason, make_spans

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
MISSING_LOGPROB = -9999.0


def logprob_convention(mode: str, params: SamplingParams) -> None:
    """Raise `ConfigError` unless a server in logprobs mode `mode` reports our logprobs for `params`."""
    if mode == "raw_logprobs":
        if params.temperature not in (0.0, 1.0):
            raise ConfigError(
                f"rollout.sampling.temperature: {params.temperature:g} needs a vLLM server started "
                "with --logprobs-mode processed_logprobs (raw ones are scored before temperature)"
            )
    elif mode == "processed_logprobs":
        if params.top_k > 0 or params.top_p < 1.0:
            raise ConfigError("rollout.sampling.top_k/top_p: vLLM's processed_logprobs are scored after top-k/top-p; "
                              "turn them off, or use temperature 1 with --logprobs-mode raw_logprobs")  # fmt: skip
    else:
        raise ConfigError(f"vLLM server logprobs_mode {mode!r} reports logits, not logprobs: start it with "
                          "--logprobs-mode raw_logprobs or processed_logprobs")  # fmt: skip


def sample_batches(requests: Sequence[GenerationRequest], size: int) -> list[list[int]]:
    """Indices of `requests` to send together: identical ones (a group's samples: same id, prompt and sampling)
    as one request for n samples, at most `size` each (a step's HTTP calls were its cost, one per sample). Greedy
    ones go one by one: vLLM refuses n > 1 at temperature 0 (sampling_params.py:766-769, `_verify_greedy_sampling`),
    and its n greedy samples would be one sample anyway."""
    same: dict[tuple[str, tuple[int, ...], SamplingParams], list[int]] = {}
    alone: list[list[int]] = []
    for i, r in enumerate(requests):
        if r.params.temperature == 0:
            alone.append([i])
        else:
            same.setdefault((r.request_id, tuple(int(t) for t in r.prompt_ids), r.params), []).append(i)
    return [b[k : k + size] for b in same.values() for k in range(0, len(b), size)] + alone


def generate_payload(request: GenerationRequest, rid: str, *, n: int = 1) -> dict[str, Any]:
    """`n` samples of `request` under the id `rid`."""
    p = request.params
    sampling: dict[str, Any] = {
        "n": n,
        "max_tokens": p.max_new_tokens,
        "temperature": float(p.temperature),  # 0: greedy, as ours
        "top_p": float(p.top_p),
        "top_k": p.top_k,  # 0 = off in vLLM too (sampling_params.py:315)
        "stop_token_ids": [int(t) for t in p.stop_token_ids],
        "ignore_eos": p.ignore_eos,
        "logprobs": 0,  # the sampled token's own logprob
        "skip_special_tokens": False,
    }
    return {"request_id": rid, "token_ids": [int(t) for t in request.prompt_ids], "sampling_params": sampling}


def parse_generate(body: Any, request: GenerationRequest, *, default_version: int) -> GenerationResult:
    """One non-streamed generate reply of one sample as a `GenerationResult`."""
    return parse_samples(body, [request], default_version=default_version)[0]


def parse_samples(body: Any, requests: Sequence[GenerationRequest], *, default_version: int) -> list[GenerationResult]:
    """A reply to a request for len(`requests`) samples (n): one result per choice, choice i for requests[i]."""
    first = requests[0].request_id
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != len(requests) or not all(isinstance(c, dict) for c in choices):
        raise ResponseError(f"{first}: reply has not exactly {len(requests)} choice(s): {str(body)[:200]}")
    by_index = {c.get("index", 0): c for c in choices}
    if sorted(by_index) != list(range(len(requests))):
        raise ResponseError(f"{first}: choice indices {sorted(by_index)} are not 0..{len(requests) - 1}")
    return [_sample(by_index[i], r, default_version) for i, r in enumerate(requests)]


def _sample(choice: dict[str, Any], request: GenerationRequest, default_version: int) -> GenerationResult:
    finish = _FINISH.get(str(choice.get("finish_reason")))
    if finish is None:
        raise ResponseError(f"{request.request_id}: unknown finish_reason {choice.get('finish_reason')!r}")
    tokens = [int(t) for t in choice.get("token_ids") or []]
    content = (choice.get("logprobs") or {}).get("content") or []
    if len(content) != len(tokens) or any(int(c["token_id"]) != t for c, t in zip(content, tokens, strict=True)):
        raise ResponseError(f"{request.request_id}: {len(content)} logprobs for {len(tokens)} tokens, or other ids")
    logprobs = np.asarray([float(c["logprob"]) for c in content], np.float32)
    if len(logprobs) and (not np.isfinite(logprobs).all() or (logprobs <= MISSING_LOGPROB).any()):
        raise ResponseError(f"{request.request_id}: vLLM had no logprob for a sampled token (-9999 or not finite)")
    spans = version_spans(choice.get("weight_versions"), len(tokens), default_version)
    return GenerationResult(request_id=request.request_id, response_ids=np.asarray(tokens, np.int32),
                            logprobs=logprobs, finish_reason=finish, version_spans=spans)  # fmt: skip


def version_spans(raw: Any, num_tokens: int, default_version: int) -> np.ndarray:
    if not raw:
        return make_spans(merge_spans([(0, default_version)], 1))
    marks = [(int(s["start"]), parse_version(s["version"], default_version)) for s in raw]
    return make_spans(merge_spans(marks, max(num_tokens, 1)))
