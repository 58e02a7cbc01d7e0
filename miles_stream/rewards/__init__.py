"""Reward functions and the registry that maps config names to them.

Built-ins: `exact_match`, `math_answer`, `toy_addition`, `scratchpad_addition`. A user's own function gets
a name in one of two ways, neither an import string in the config:
- from an installed package, with an entry point in the group `miles_stream.rewards`
  (`[project.entry-points."miles_stream.rewards"] my_reward = "mypkg.rewards:fn"` in its pyproject.toml),
  found the first time that name is asked for;
- in code, on the registry the process builds at its edge: `registry.register("my_reward", fn)`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from miles_stream.errors import ConfigError
from miles_stream.rewards.base import RewardError, RewardFn, RewardInput, inline, is_per_group, score_group
from miles_stream.rewards.builtin import (
    exact_match,
    final_answer,
    math_answer,
    normalize_answer,
    scratchpad_addition,
    toy_addition,
)

ENTRY_POINT_GROUP = "miles_stream.rewards"
BUILTIN: dict[str, Any] = {
    "exact_match": exact_match,
    "math_answer": math_answer,
    "toy_addition": toy_addition,
    "scratchpad_addition": scratchpad_addition,
}


class RewardRegistry:
    """Names to reward functions: the built-ins, installed entry points, and whatever is registered."""

    def __init__(self) -> None:
        self._fns: dict[str, Any] = dict(BUILTIN)

    def register(self, name: str, fn: Any) -> None:
        if not callable(fn):
            raise ConfigError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        if self._fns.get(name, fn) is not fn:
            raise ConfigError(f"reward {name!r} is already registered")
        self._fns[name] = fn

    def get(self, name: str) -> Any:
        if name not in self._fns:
            for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
                self.register(name, ep.load())
        if name not in self._fns:
            raise ConfigError(f"unknown reward {name!r} (registered: {', '.join(sorted(self._fns))})")
        return self._fns[name]


__all__ = [
    "BUILTIN",
    "RewardError",
    "RewardFn",
    "RewardInput",
    "RewardRegistry",
    "exact_match",
    "final_answer",
    "inline",
    "is_per_group",
    "math_answer",
    "normalize_answer",
    "score_group",
    "scratchpad_addition",
    "toy_addition",
]
