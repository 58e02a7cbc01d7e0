"""The prompt feeder: a dataset, shuffled per epoch, published to `{ns}:prompts` under backpressure.

    dataset (JSONL | Parquet) ──rows──► Feeder.run ──XADD + position, one MULTI──► {ns}:prompts
                                            ▲ waits while the "producers" group has max_queued unacknowledged

Its position (epoch, next index into that epoch's permutation) lives in the `{ns}:feeder` hash and moves in
the same transaction as each XADD, so a feeder stopped at any point, even with kill -9, resumes exactly where
it stopped: no prompt skipped, none published twice. Each publication WATCHes the position, so feeders started
side by side on one namespace (by mistake, or one per host) share the dataset: each position is published once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from miles_stream.bus import Backpressure, BusConfig, Keys, RetryPolicy, ensure_group
from miles_stream.bus.connection import read_watched
from miles_stream.bus.run import RunIdentity, check_run, run_key
from miles_stream.bus.streams import DATA
from miles_stream.config import check
from miles_stream.errors import ConfigError, MilesStreamError
from miles_stream.prompts import PromptRecord, encode_prompt

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class FeederConfig:
    path: str = ""  # a .jsonl file or a .parquet file
    prompt_key: str = "prompt"
    label_key: str = "label"
    tokenizer: str = ""  # a local model directory whose chat template to apply, with apply_chat_template
    apply_chat_template: bool = False
    seed: int = 0
    num_epochs: int = 1  # 0 = until stopped
    max_queued: int = 256  # prompts published and not yet acknowledged by the producers
    group: str = "producers"

    def __post_init__(self) -> None:
        check(self.num_epochs >= 0, "feeder.num_epochs", "must be >= 0 (0 = until stopped)")
        check(self.max_queued >= 1, "feeder.max_queued", "must be >= 1")
        check(not self.apply_chat_template or bool(self.tokenizer), "feeder.tokenizer", "apply_chat_template needs one")


@dataclass(frozen=True, slots=True)
class Row:
    text: str
    label: str | None


def load_rows(config: FeederConfig) -> list[Row]:
    """Every row of the dataset as (prompt text, label); a row without the prompt field is an error."""
    path = Path(config.path)
    if not config.path or not path.is_file():
        raise ConfigError(f"feeder.path: {config.path!r} is not a file")
    rows = []
    for at, r in read_records(path):
        if config.prompt_key not in r:
            raise ConfigError(f"{at} has no {config.prompt_key!r} field (fields: {sorted(r)})")
        prompt, label = r[config.prompt_key], r.get(config.label_key)
        if not isinstance(prompt, str):  # a dict or a list would be trained as its repr
            raise ConfigError(f"{at}: {config.prompt_key!r} must be a string, not {type(prompt).__name__}")
        rows.append(Row(prompt, None if label is None else str(label)))
    if not rows:
        raise ConfigError(f"feeder.path: {path} holds no rows")
    if config.apply_chat_template:
        rows = with_chat_template(rows, config.tokenizer)
    return rows


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every record of a .jsonl or .parquet file, each with where it is for messages: `path:line` (JSONL,
    the file's own line number) or `row N of path` (Parquet, counted from 0 as Parquet tools do)."""
    if path.suffix == ".parquet":
        return [(f"row {n} of {path}", r) for n, r in _read_parquet(path)]
    return [(f"{path}:{n}", r) for n, r in _read_jsonl(path)]


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line."""
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{n} must be a JSON object")
            out.append((n, record))
    return out


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, record), rows counted from 0 as Parquet tools do."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("reading Parquet needs pyarrow: pip install 'miles-stream[parquet]'") from exc
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return list(enumerate(rows))


def with_chat_template(rows: list[Row], tokenizer_dir: str) -> list[Row]:
    """Each row's text as one user turn of the tokenizer's chat template, ending where the answer starts."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [
        Row(tokenizer.apply_chat_template([{"role": "user", "content": r.text}], tokenize=False,
                                          add_generation_prompt=True), r.label)
        for r in rows
    ]  # fmt: skip


class Feeder:
    def __init__(self, redis: aioredis.Redis, keys: Keys, bus: BusConfig, config: FeederConfig, rows: Sequence[Row]):
        self.redis, self.keys, self.config, self.rows = redis, keys, config, rows
        self.backpressure = Backpressure(redis, keys.prompts, replace(bus, max_backlog_entries=config.max_queued))
        self.retry = RetryPolicy(attempts=0)
        self.maxlen = bus.maxlen_cap
        self.published = 0  # read back from Redis, so a publication whose reply was lost still counts
        self.id = uuid.uuid4().hex  # this feeder's field in the `{ns}:feeder:published` hash
        self.run_identity: RunIdentity | None = None  # with one, every position read checks the run is intact
        self._kept_order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    @property
    def state_key(self) -> str:
        return f"{self.keys.namespace}:feeder"

    @property
    def counts_key(self) -> str:
        return f"{self.keys.namespace}:feeder:published"

    def order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`: a permutation fixed by (seed, epoch)."""
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.rows))

    async def position(self) -> tuple[int, int]:
        """(epoch, index into its order) of the next prompt. Raises DataLossError where Redis lost the run
        (the position would read as the start: the whole dataset fed again without a word)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.state_key)
            pipe.get(run_key(self.keys))
            state, run_now = await pipe.execute()
        return self._parse(state, run_now)

    def _parse(self, state: dict[Any, Any], run_now: Any) -> tuple[int, int]:
        if self.run_identity is not None:
            check_run(self.keys, self.run_identity, run_now)
        if not state:
            return 0, 0
        size = int(state[b"rows"])
        if size != len(self.rows) or int(state[b"seed"]) != self.config.seed:
            raise MilesStreamError(
                f"{self.state_key} was written for {size} rows and seed {int(state[b'seed'])}, this dataset has "
                f"{len(self.rows)} rows and seed {self.config.seed}: use another namespace, or delete the key"
            )
        return int(state[b"epoch"]), int(state[b"position"])

    def _finished(self, epoch: int) -> bool:
        return self.config.num_epochs != 0 and epoch >= self.config.num_epochs

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Publish until the epochs are done or `stop` is set; returns how many prompts this call published."""
        stop = stop or asyncio.Event()
        retry = replace(self.retry, stop=stop)  # told to stop in an outage: give up after its grace
        await retry.run(lambda: ensure_group(self.redis, self.keys.prompts, self.config.group))
        at = await retry.run(self.position)
        log.info("feeder_resumed" if at != (0, 0) else "feeder_started", epoch=at[0], position=at[1])
        while not stop.is_set() and not self._finished(at[0]):
            await retry.run(lambda: self.backpressure.wait_for_room(stop=stop))  # rides out a blip too
            if stop.is_set():  # the stream stayed full (nobody reads it) until we were told to stop
                break
            now = await retry.run(functools.partial(self._publish, *at))
            if now[0] > at[0]:
                log.info("feeder_epoch_done", epoch=now[0] - 1)
            at = now
        return self.published

    async def _publish(self, epoch: int, position: int) -> tuple[int, int]:
        """XADD the prompt at (epoch, position) and move the position past it, in one transaction that applies
        only while the position is still there (WATCH). Returns the position after. Where the position has
        moved (another feeder published it, or this call's own earlier try went through and its reply was
        lost) nothing is written: each position is published exactly once, by whichever feeder gets there
        first. The same transaction counts the publication under this feeder's id, and every call reads that
        count back, so `published` is exact even where a reply was lost."""
        async with self.redis.pipeline(transaction=True) as pipe:
            await read_watched(pipe.watch(self.state_key, run_key(self.keys)))
            state = await read_watched(pipe.hgetall(self.state_key))
            found = self._parse(state, await read_watched(pipe.get(run_key(self.keys))))
            self.published = int(await read_watched(pipe.hget(self.counts_key, self.id)) or 0)
            if found != (epoch, position) or self._finished(epoch):
                return found
            index = int(self._order(epoch)[position])
            row = self.rows[index]
            record = PromptRecord(key=str(index), text=row.text, label=row.label, epoch=epoch, index=index)
            nxt = (epoch, position + 1) if position + 1 < len(self.rows) else (epoch + 1, 0)
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.xadd(self.keys.prompts, {DATA: encode_prompt(record)}, maxlen=self.maxlen, approximate=True)
            pipe.hset(self.state_key, mapping={"epoch": nxt[0], "position": nxt[1], "rows": len(self.rows),
                                               "seed": self.config.seed})  # fmt: skip
            pipe.hincrby(self.counts_key, self.id, 1)
            try:
                self.published = int((await pipe.execute())[-1])
            except rexc.WatchError:  # moved meanwhile (or the EXEC's reply was lost): read it again
                return epoch, position
        self.backpressure.record_sent(1)
        return nxt

    def _order(self, epoch: int) -> np.ndarray:
        """`order(epoch)`, kept for the epoch being fed (a permutation of a large dataset is not free)."""
        if self._kept_order[0] != epoch:
            self._kept_order = (epoch, self.order(epoch))
        return self._kept_order[1]
