"""The trainer's view of evaluation and of its producers: `{ns}:eval` and the producers' heartbeats, logged next
to the training metrics.

    {ns}:eval ──XREAD (no group)──► log "eval_result" (version evaluated, the trainer's step and version now)
                                    ──► MetricsSink.write_extra: TensorBoard / W&B at the trainer's step
    heartbeats ──every `every_s`──► producers' count, tokens, groups, in flight, tokens/s ──► the same

A background task of the trainer's event loop: it reads Redis only, never the step's data, so it costs the
trainer a blocking XREAD on a connection of its own. A Redis blip is retried; a malformed entry is skipped.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import structlog

from miles_stream.bus import Keys, alive_members
from miles_stream.bus.connection import is_transient
from miles_stream.errors import SchemaError
from miles_stream.evaluation.record import FIELD, EvalResult, decode_result
from miles_stream.trainer.metrics import MetricsSink

log = structlog.get_logger(__name__)


async def last_entry_id(redis: Any, stream: str) -> str:
    newest: Any = await redis.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


def parse_results(entries: Any) -> list[EvalResult]:
    """The entries of `{ns}:eval` that decode (a malformed one is logged and skipped)."""
    out = []
    for entry_id, fields in entries:
        try:
            out.append(decode_result(fields[FIELD]))
        except (KeyError, SchemaError) as exc:
            log.warning("eval_entry_malformed", id=entry_id.decode(), error=str(exc) or "no d field")
    return out


class RunFollower:
    def __init__(self, redis: Any, keys: Keys, sink: MetricsSink, *, step: Callable[[], int],
                 version: Callable[[], int], ttl_s: float, every_s: float = 10.0,
                 block_ms: int = 1000) -> None:  # fmt: skip
        """`redis`: an asyncio client whose socket timeout allows XREAD BLOCK `block_ms` (bus.block_ms)."""
        self.redis, self.keys, self.sink = redis, keys, sink
        self.step, self.version, self.ttl_s, self.every_s, self.block_ms = step, version, ttl_s, every_s, block_ms
        self.results: list[EvalResult] = []  # the ones seen, for tests and the last one's log
        self._tokens: tuple[float, int] | None = None  # (when, producers' tokens then)

    async def run(self) -> None:
        """Until cancelled."""
        last = await self._retrying(lambda: last_entry_id(self.redis, self.keys.eval), "0-0")
        next_summary = time.monotonic()
        while True:
            reply: Any = await self._retrying(functools.partial(self.redis.xread, {self.keys.eval: last},
                                                                block=self.block_ms), None)  # fmt: skip
            if reply:
                entries = reply[0][1]
                last = entries[-1][0].decode()
                for result in parse_results(entries):
                    self._log_eval(result)
            if time.monotonic() >= next_summary:
                next_summary = time.monotonic() + self.every_s
                await self._retrying(self._producers, None)

    def _log_eval(self, r: EvalResult) -> None:
        self.results.append(r)
        del self.results[:-100]
        log.info("eval_result", eval_version=r.version, trainer_step=self.step(), trainer_version=self.version(),
                 pass_at_1=round(r.pass_at_1, 4), pass_at_k={k: round(v, 4) for k, v in r.pass_at_k.items()},
                 reward_mean=round(r.reward_mean, 4), evaluator=r.evaluator_id)  # fmt: skip
        self.sink.write_extra(self.step(), r.scalars() | {"eval/version": r.version})

    async def _producers(self) -> None:
        members = await alive_members(self.redis, self.keys, self.ttl_s)
        producers = [m.info for m in members if m.role == "producer"]
        tokens = sum(int(p.get("tokens", 0)) for p in producers)
        now = time.monotonic()
        summary: dict[str, float] = {"producers/count": len(producers), "producers/tokens": tokens,
                   "producers/groups": sum(int(p.get("groups", 0)) for p in producers),
                   "producers/in_flight": sum(int(p.get("in_flight", 0)) for p in producers)}  # fmt: skip
        if self._tokens is not None and now > self._tokens[0]:
            summary["producers/tokens_per_s"] = max(0, tokens - self._tokens[1]) / (now - self._tokens[0])
        self._tokens = (now, tokens)
        if producers:
            self.sink.write_extra(self.step(), summary)

    async def _retrying(self, call: Callable[[], Any], default: Any) -> Any:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("run_follower_retry", error=str(exc))
            await asyncio.sleep(1.0)
            return default
