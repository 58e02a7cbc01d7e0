"""The prompt feeder: a dataset, shuffled per epoch, published to `{ns}:prompts` under backpressure (with
`bus.partitions` N > 1: position i of an epoch's order to partition i mod N, each with its own position).

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
from miles_stream.bus.run import RunIdentity, check_partitions, check_run, partitions_key, run_key
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
    """Publishes the dataset to the prompt stream, or over `lanes` (one (client, Keys) per partition,
    `bus/partitioned.py`): the prompt at position i of an epoch's order goes to partition i mod N, each partition
    keeping its own position (the next position of its share) in its own slot, moved with each XADD there."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, bus: BusConfig, config: FeederConfig, rows: Sequence[Row],
                 lanes: Sequence[tuple[aioredis.Redis, Keys]] = ()):  # fmt: skip
        self.redis, self.keys, self.config, self.rows = redis, keys, config, rows
        self.lanes = list(lanes) or [(redis, keys)]
        share = -(-config.max_queued // len(self.lanes))  # each partition's part of max_queued, rounded up
        self.pressure = [Backpressure(client, k.prompts, replace(bus, max_backlog_entries=share))
                         for client, k in self.lanes]  # fmt: skip
        self.retry = RetryPolicy(attempts=0)
        self.maxlen = bus.maxlen_cap
        self.counts = [0] * len(self.lanes)  # read back from Redis, so a publication whose reply was lost counts
        self.id = uuid.uuid4().hex  # this feeder's field in the `{ns}:feeder:published` hash
        self.run_identity: RunIdentity | None = None  # with one, every position read checks the run is intact
        self._kept_order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    @property
    def published(self) -> int:
        return sum(self.counts)

    @property
    def backpressure(self) -> Backpressure:
        return self.pressure[0]

    def state_key_of(self, lane: int) -> str:
        return f"{self.lanes[lane][1].namespace}:feeder"

    def counts_key_of(self, lane: int) -> str:
        return f"{self.lanes[lane][1].namespace}:feeder:published"

    @property
    def state_key(self) -> str:
        return self.state_key_of(0)

    @property
    def counts_key(self) -> str:
        return self.counts_key_of(0)

    def _run_key(self, lane: int) -> str:
        """The run identity the lane's transaction checks: the run's own key, or with partitions its copy in the
        partition's slot (`_pin_partitions`): a partition whose node lost its data has lost the copy too."""
        return run_key(self.lanes[lane][1])

    def order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`: a permutation fixed by (seed, epoch)."""
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.rows))

    async def position(self) -> tuple[int, int]:
        """(epoch, index into its order) of the next prompt (with partitions, the earliest among them). Raises
        DataLossError where Redis lost the run (the position would read as the start: the whole dataset fed
        again without a word)."""
        return min([await self.position_of(lane) for lane in range(len(self.lanes))])

    async def position_of(self, lane: int) -> tuple[int, int]:
        client = self.lanes[lane][0]
        async with client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.state_key_of(lane))
            pipe.get(self._run_key(lane))
            state, run_now = await pipe.execute()
        return self._parse(lane, state, run_now)

    def _parse(self, lane: int, state: dict[Any, Any], run_now: Any) -> tuple[int, int]:
        if self.run_identity is not None:
            check_run(self.lanes[lane][1], self.run_identity, run_now)
        if not state:
            return 0, lane
        size, stride = int(state[b"rows"]), int(state.get(b"stride", 1))
        if size != len(self.rows) or int(state[b"seed"]) != self.config.seed or stride != len(self.lanes):
            raise MilesStreamError(
                f"{self.state_key_of(lane)} was written for {size} rows, seed {int(state[b'seed'])} and {stride} "
                f"partition(s); this feeder has {len(self.rows)} rows, seed {self.config.seed} and "
                f"{len(self.lanes)}: use another namespace, or delete the key"
            )
        return int(state[b"epoch"]), int(state[b"position"])

    def _finished(self, lane: int, epoch: int) -> bool:
        """Whether the lane has nothing more to publish: its epochs are done, or it has no rows (more
        partitions than rows)."""
        return (self.config.num_epochs != 0 and epoch >= self.config.num_epochs) or lane >= len(self.rows)

    def _after(self, lane: int, epoch: int, position: int) -> tuple[int, int]:
        stride = len(self.lanes)
        return (epoch, position + stride) if position + stride < len(self.rows) else (epoch + 1, lane)

    async def _pin_partitions(self) -> None:
        """The run's partition count, kept in the run's own slot (`{ns}:partitions`) from its first feeder on.
        A feeder with another count is refused: its positions would be read from keys never written, and the
        whole dataset fed again. On the first start (no count yet) each partition gets its copy of the run
        identity, and only then the count; once the count is there a missing copy is a partition that lost its
        data (`position_of` raises), not one to create again, which would feed that partition's share twice."""
        key, n = partitions_key(self.keys), len(self.lanes)
        stored = await self.redis.get(key)
        if stored is None:
            if n > 1 and await self.redis.exists(f"{self.keys.namespace}:feeder"):
                stored = b"1"  # fed before the count was kept, and without partitions
            else:  # the first feed: with the count the run's first process came with (a trainer may be waiting)
                await check_partitions(self.redis, self.keys, n)
                if self.run_identity is not None and n > 1:
                    for client, k in self.lanes:
                        await client.set(run_key(k), self.run_identity.encode(), nx=True)
                await self.redis.set(key, n, nx=True)
                stored = await self.redis.get(key)
        fed = int(stored or n)  # (gone again at once only with the run itself: position_of says so)
        if fed != n:
            raise MilesStreamError(f"{key}: this run was fed with bus.partitions={fed}; this feeder has {n} "
                                   f"(use the run's count, or another namespace)")  # fmt: skip

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Publish until the epochs are done or `stop` is set; returns how many prompts this call published."""
        stop = stop or asyncio.Event()
        retry = replace(self.retry, stop=stop)  # told to stop in an outage: give up after its grace
        for client, k in self.lanes:
            await retry.run(functools.partial(ensure_group, client, k.prompts, self.config.group))
        await retry.run(self._pin_partitions)
        at = [await retry.run(functools.partial(self.position_of, lane)) for lane in range(len(self.lanes))]
        log.info("feeder_resumed" if any(a != (0, lane) for lane, a in enumerate(at)) else "feeder_started",
                 epoch=min(at)[0], position=min(at)[1], partitions=len(self.lanes))  # fmt: skip
        while not stop.is_set():
            open_lanes = [lane for lane in range(len(self.lanes)) if not self._finished(lane, at[lane][0])]
            if not open_lanes:
                break
            lane = min(open_lanes, key=lambda q: at[q])  # the earliest position next: the dataset's order
            await retry.run(functools.partial(self.pressure[lane].wait_for_room, stop=stop))  # rides out a blip too
            if stop.is_set():  # the stream stayed full (nobody reads it) until we were told to stop
                break
            now = await retry.run(functools.partial(self._publish, lane, *at[lane]))
            if now[0] > at[lane][0]:
                log.info("feeder_epoch_done", epoch=now[0] - 1, partition=lane)
            at[lane] = now
        return self.published

    async def _publish(self, lane: int, epoch: int, position: int) -> tuple[int, int]:
        """XADD the prompt at (epoch, position) and move the lane's position past it, in one transaction that
        applies only while the position is still there (WATCH). Returns the position after. Where the position
        has moved (another feeder published it, or this call's own earlier try went through and its reply was
        lost) nothing is written: each position is published exactly once, by whichever feeder gets there
        first. The same transaction counts the publication under this feeder's id, and every call reads that
        count back, so `published` is exact even where a reply was lost."""
        client, keys = self.lanes[lane]
        state_key, counts_key = self.state_key_of(lane), self.counts_key_of(lane)
        async with client.pipeline(transaction=True) as pipe:
            await read_watched(pipe.watch(state_key, self._run_key(lane)))
            state = await read_watched(pipe.hgetall(state_key))
            found = self._parse(lane, state, await read_watched(pipe.get(self._run_key(lane))))
            self.counts[lane] = int(await read_watched(pipe.hget(counts_key, self.id)) or 0)
            if found != (epoch, position) or self._finished(lane, epoch):
                return found
            index = int(self._order(epoch)[position])
            row = self.rows[index]
            record = PromptRecord(key=str(index), text=row.text, label=row.label, epoch=epoch, index=index)
            nxt = self._after(lane, epoch, position)
            mapping: dict[Any, Any] = {"epoch": nxt[0], "position": nxt[1], "rows": len(self.rows),
                                       "seed": self.config.seed}  # fmt: skip
            if len(self.lanes) > 1:
                mapping["stride"] = len(self.lanes)
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.xadd(keys.prompts, {DATA: encode_prompt(record)}, maxlen=self.maxlen, approximate=True)
            pipe.hset(state_key, mapping=mapping)
            pipe.hincrby(counts_key, self.id, 1)
            try:
                self.counts[lane] = int((await pipe.execute())[-1])
            except rexc.WatchError:  # moved meanwhile (or the EXEC's reply was lost): read it again
                return epoch, position
        self.pressure[lane].record_sent(1)
        return nxt

    def _order(self, epoch: int) -> np.ndarray:
        """`order(epoch)`, kept for the epoch being fed (a permutation of a large dataset is not free)."""
        if self._kept_order[0] != epoch:
            self._kept_order = (epoch, self.order(epoch))
        return self._kept_order[1]
