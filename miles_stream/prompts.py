"""Prompt records on `{ns}:prompts`: what the feeder publishes and rollout producers claim.

One entry, field `d`: a msgpack map with exactly the keys {v, key, text, label, epoch, index}. `key` names the
prompt for accounting (`"{index}"`, the same in every epoch); `text` is what the model is given (with the chat
template applied, if the feeder was asked to); `label` is what the reward function compares against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgpack

from miles_stream.errors import SchemaError

PROMPT_SCHEMA_VERSION: Final = 1
_KEYS: Final = frozenset({"v", "key", "text", "label", "epoch", "index"})
MAX_PROMPT_BYTES: Final = 4 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptRecord:
    key: str
    text: str
    label: str | None
    epoch: int
    index: int


def encode_prompt(p: PromptRecord) -> bytes:
    validate_prompt(p)
    data: bytes = msgpack.packb(
        {
            "v": PROMPT_SCHEMA_VERSION,
            "key": p.key,
            "text": p.text,
            "label": p.label,
            "epoch": p.epoch,
            "index": p.index,
        },
        use_bin_type=True,
    )
    return data


def decode_prompt(data: bytes | bytearray) -> PromptRecord:
    if len(data) > MAX_PROMPT_BYTES:
        raise SchemaError(f"prompt entry is {len(data)} bytes, over the limit of {MAX_PROMPT_BYTES}")
    try:
        m: Any = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises many unrelated types for corrupt input
        raise SchemaError(f"prompt entry is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(m, dict):
        raise SchemaError(f"prompt entry must be a map, got {type(m).__name__}")
    if m.get("v") != PROMPT_SCHEMA_VERSION:
        raise SchemaError(f"unknown prompt schema version {m.get('v')!r} (this build reads {PROMPT_SCHEMA_VERSION})")
    if set(m) != _KEYS:
        raise SchemaError(f"prompt entry keys {sorted(map(str, m))} differ from {sorted(_KEYS)}")
    record = PromptRecord(key=m["key"], text=m["text"], label=m["label"], epoch=m["epoch"], index=m["index"])
    validate_prompt(record)
    return record


def validate_prompt(p: PromptRecord) -> None:
    if not isinstance(p.key, str) or not p.key:
        raise SchemaError("prompt key must be a non-empty string")
    if not isinstance(p.text, str):
        raise SchemaError(f"prompt text must be a string, got {type(p.text).__name__}")
    if p.label is not None and not isinstance(p.label, str):
        raise SchemaError(f"prompt label must be a string or null, got {type(p.label).__name__}")
    for name in ("epoch", "index"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SchemaError(f"prompt {name} must be a non-negative integer, got {value!r}")
