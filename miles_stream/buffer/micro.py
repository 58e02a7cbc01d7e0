"""Micro-batches by a token budget: length-sorted padding.

Samples are sorted by length (longest first) and cut into runs whose padded size, rows x the longest row,
stays within `max_tokens`. Sorting keeps padding small without packing sequences into one row (which would
need varlen attention the HF eager/SDPA paths do not give). A sample longer than the budget gets a
micro-batch of its own.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped into micro-batches of at most `max_tokens` padded tokens each."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plans: list[list[int]] = []
    current: list[int] = []
    for i in order:  # longest first, so a micro-batch's first row is its longest
        if current and lengths[current[0]] * (len(current) + 1) > max_tokens:
            plans.append(current)
            current = []
        current.append(i)
    if current:
        plans.append(current)
    return plans
