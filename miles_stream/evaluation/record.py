"""`EvalResult`: one weight version's scores, as the evaluator announces them on `{ns}:eval`.

One entry per version evaluated, field `d`: a msgpack map with the keys of `EvalResult` plus `v` (schema
version). Decoding checks the keys and types; a malformed entry is skipped by readers (status, the trainer),
never fatal. The same record is one line of eval.jsonl (`as_row`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

import msgpack

from miles_stream.errors import SchemaError

EVAL_SCHEMA_VERSION: Final = 1
FIELD: Final = b"d"


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalResult:
    version: int  # the weight version evaluated (0: the weights the engine started with)
    evaluator_id: str
    dataset: str  # the held-out file
    prompts: int
    n_samples: int  # sampled responses per prompt (0: greedy only)
    pass_at_1: float  # greedy: the share of prompts whose greedy response is correct
    pass_at_k: dict[int, float] = field(default_factory=dict)  # k -> unbiased pass@k over the n samples
    reward_mean: float  # over the sampled responses (the greedy ones when n_samples = 0)
    greedy_reward_mean: float
    response_tokens_mean: float  # over the sampled responses (greedy when n_samples = 0)
    truncated_rate: float  # responses that hit max_new_tokens (finish reason "length"), same population
    eval_s: float  # wall time of the evaluation
    skipped: int  # versions announced since the previous evaluation and not evaluated (every-k, or behind)
    created_at: float  # unix time

    def as_row(self) -> dict[str, Any]:
        """Plain JSON (pass_at_k's keys become strings: {"4": 0.61})."""
        row = asdict(self)
        row["pass_at_k"] = {str(k): v for k, v in sorted(self.pass_at_k.items())}
        return row

    def scalars(self) -> dict[str, float]:
        """The numbers a logger plots (TensorBoard, W&B), under eval/."""
        out = {"eval/pass_at_1": self.pass_at_1, "eval/reward_mean": self.reward_mean,
               "eval/greedy_reward_mean": self.greedy_reward_mean,
               "eval/response_tokens_mean": self.response_tokens_mean, "eval/truncated_rate": self.truncated_rate,
               "eval/seconds": self.eval_s}  # fmt: skip
        return out | {f"eval/pass_at_k/{k}": v for k, v in sorted(self.pass_at_k.items())}


_TYPES: Final = {f.name: f.type for f in fields(EvalResult)}


def encode_result(r: EvalResult) -> bytes:
    data: bytes = msgpack.packb({"v": EVAL_SCHEMA_VERSION, **asdict(r)}, use_bin_type=True)
    return data


def decode_result(data: bytes) -> EvalResult:
    try:
        m: Any = msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises many unrelated types for corrupt input
        raise SchemaError(f"eval entry is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(m, dict) or m.get("v") != EVAL_SCHEMA_VERSION:
        raise SchemaError(f"eval entry: schema {m.get('v') if isinstance(m, dict) else m!r}, this build reads "
                          f"{EVAL_SCHEMA_VERSION}")  # fmt: skip
    if set(m) - {"v"} != set(_TYPES):
        raise SchemaError(f"eval entry keys {sorted(map(str, m))} differ from {sorted(_TYPES)}")
    for name, tp in _TYPES.items():
        value = m[name]
        ok = {"int": isinstance(value, int) and not isinstance(value, bool), "str": isinstance(value, str),
              "float": isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
              "dict[int, float]": isinstance(value, dict) and all(
                  isinstance(k, int) and isinstance(v, int | float) for k, v in value.items())}[str(tp)]  # fmt: skip
        if not ok:
            raise SchemaError(f"eval entry: {name} = {value!r} is not {tp}")
    return EvalResult(**{k: v for k, v in m.items() if k != "v"})
