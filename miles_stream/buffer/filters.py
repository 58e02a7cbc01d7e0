"""Dynamic filters: drop groups that would teach nothing before they take a place in a batch.

A `DynamicFilter` is a callable `(group) -> reason or None`; None keeps the group. Built in:
`reward_variance` drops groups whose rewards are all equal (their GRPO advantages are all zero: DAPO's
dynamic sampling). A user's filter is registered in `FILTERS` under a name and named in `buffer.filters`.
"""

from __future__ import annotations

from typing import Protocol

from miles_stream.schema import TrajectoryGroup


class DynamicFilter(Protocol):
    def __call__(self, group: TrajectoryGroup) -> str | None: ...


def reward_variance(group: TrajectoryGroup) -> str | None:
    rewards = group.rewards
    if len(rewards) > 1 and max(rewards) == min(rewards):
        return f"all {len(rewards)} rewards equal {rewards[0]}"
    return None


def all_truncated(group: TrajectoryGroup) -> str | None:
    """Drop a group none of whose samples finished (every one hit the length limit)."""
    if all(s.finish_reason == "length" for s in group.samples):
        return "every sample hit the length limit"
    return None


FILTERS: dict[str, DynamicFilter] = {"reward_variance": reward_variance, "all_truncated": all_truncated}
