"""The `RewardFn` protocol and the one way rewards are computed: `score_group`.

A reward function scores either one sample (`per_group = False`) or a whole group at once (`per_group =
True`, for rewards relative within the group), and may be a plain function or a coroutine function. Plain
functions run on a worker thread, so a slow verifier never blocks the producer's loop, except those marked
`inline` (pure and cheap, as the built-ins are: a string compare costs less than the hand-off to a thread,
which at 2,000 samples a second took an eighth of the producer's loop). Every other call has a timeout; a
function that raises, hangs or returns something that is not a finite number gives a `RewardError` naming
the function and the reason, and the producer decides what to do with that group.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from miles_stream.errors import MilesStreamError


class RewardError(MilesStreamError):
    """A reward function raised, timed out or returned a value that is not a finite number."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RewardInput:
    """What a reward function sees of one sample."""

    prompt: str
    response: str
    label: str | None = None
    finish_reason: str = "stop"
    metadata: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class RewardFn(Protocol):
    """Score one sample, or with `per_group = True` a whole group (one float per sample, in order)."""

    per_group: bool

    def __call__(self, x: Any, /) -> Any: ...


def is_per_group(fn: object) -> bool:
    return bool(getattr(fn, "per_group", False))


F = TypeVar("F")


def inline(fn: F) -> F:
    """Mark a plain reward function as pure and cheap (microseconds): it is called on the producer's loop,
    with no worker thread and so no timeout. Only for functions that cannot block or hang."""
    fn.inline = True  # type: ignore[attr-defined]
    return fn


async def score_group(fn: Any, samples: Sequence[RewardInput], *, timeout_s: float) -> list[float]:
    """Rewards for every sample of a group, in order."""
    name = getattr(fn, "__name__", type(fn).__name__)
    if is_per_group(fn):
        values = await _call(fn, list(samples), name, timeout_s)
        if not isinstance(values, Sequence) or len(values) != len(samples):
            raise RewardError(f"reward {name!r} must return {len(samples)} values for the group, got {values!r}")
        return [_finite(v, name) for v in values]
    if getattr(fn, "inline", False):
        return [_finite(_inline_call(fn, s, name), name) for s in samples]
    calls = [_call(fn, s, name, timeout_s) for s in samples]
    return [_finite(v, name) for v in await asyncio.gather(*calls)]


def _inline_call(fn: Any, arg: Any, name: str) -> Any:
    try:
        return fn(arg)
    except Exception as exc:
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc


async def _call(fn: Any, arg: Any, name: str, timeout_s: float) -> Any:
    try:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
            result: Awaitable[Any] = fn(arg)
            return await asyncio.wait_for(result, timeout_s)
        return await asyncio.wait_for(asyncio.to_thread(fn, arg), timeout_s)
    except TimeoutError as exc:
        raise RewardError(f"reward {name!r} did not answer within {timeout_s}s") from exc
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RewardError(f"reward {name!r} returned {value!r}, not a finite number")
    return float(value)
