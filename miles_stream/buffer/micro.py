"""Micro-batches by a token budget: length-sorted padding, or packing.

Padded (default): samples are sorted by length (longest first) and cut into runs whose padded size, rows x the
longest row, stays within `max_tokens`. Packed: samples are placed, longest first, into the first micro-batch
whose total length stays within `max_tokens` (first-fit decreasing); such a micro-batch becomes one row with
the sequences side by side (`trainer.batch.packed_inputs`), no padding at all. A sample longer than the budget
gets a micro-batch of its own either way. Packing saves the padding's compute only where attention skips the
blocks between sequences (FlexAttention); through SDPA the model masks the whole packed row.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, *, packed: bool = False) -> list[list[int]]:
    """Indices into `lengths`, grouped into micro-batches of at most `max_tokens` (padded, or summed) tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plans: list[list[int]] = []
    if packed:
        totals: list[int] = []
        for i in order:
            slot = next((k for k, t in enumerate(totals) if t + lengths[i] <= max_tokens), None)
            if slot is None:
                plans.append([i])
                totals.append(lengths[i])
            else:
                plans[slot].append(i)
                totals[slot] += lengths[i]
        return plans
    current: list[int] = []
    for i in order:  # longest first, so a micro-batch's first row is its longest
        if current and lengths[current[0]] * (len(current) + 1) > max_tokens:
            plans.append(current)
            current = []
        current.append(i)
    if current:
        plans.append(current)
    return plans
