"""The demo's PNG: rollout reward and greedy accuracy against trainer steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(metrics: Sequence[dict[str, Any]], evals: Sequence[tuple[int, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps = [m["step"] for m in metrics]
    reward = [m["rollout_reward"] for m in metrics]
    ax.plot(steps, reward, color="tab:blue", alpha=0.25, linewidth=1)
    ax.plot(steps, moving_average(reward, 10), color="tab:blue", label="rollout reward (sampled, T=1; 10-step mean)")
    if evals:
        ax.plot([s for s, _ in evals], [a for _, a in evals], "o-", color="tab:orange", markersize=3,
                label="accuracy (greedy, all 100 prompts)")  # fmt: skip
    ax.set_xlabel("trainer step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
