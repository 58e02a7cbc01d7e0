"""Batches and a resume check shared by the Megatron backend's tests (tests/unit/test_megatron_*.py).

Every batch: four groups of four samples of varied lengths (the pad id, token 0, among the tokens), rewards 0/1,
behaviour logprobs the HF model's own at temperature 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

VOCAB = 50


def random_trace(rng: np.random.Generator, positions: int, experts: int, layers: int, topk: int) -> np.ndarray:
    """[positions, layers, K] distinct experts a token (as a router's top-k is), uint8 as the wire carries it."""
    return np.stack([np.stack([rng.permutation(experts)[:topk] for _ in range(layers)]) for _ in range(positions)])\
        .astype(np.uint8)  # fmt: skip


def fixed_batch(model_dir: Path, seed: int, trace: tuple[int, int, int] | None = None) -> RolloutBatch:
    """The batch of `seed`; with `trace` (experts, layers, top-k) each sample carries a random routing trace,
    except the third group's (those tokens keep the router's own choice)."""
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    rng = np.random.default_rng(seed)
    made = []
    for g in range(4):
        group = synthetic_group(rng, n_samples=4, prompt_len=int(rng.integers(2, 9)),
                                response_len=int(rng.integers(3, 12)), vocab=VOCAB)  # fmt: skip
        samples = tuple(replace(s, reward=r, routing=None if trace is None or g == 2 else
                                random_trace(rng, len(group.prompt_ids) + len(s.response_ids) - 1, *trace))
                        for s, r in zip(group.samples, (0.0, 1.0, 0.0, 1.0), strict=True))  # fmt: skip
        made.append(replace(group, samples=samples))
    batch = collate(made)
    with torch.no_grad():
        logp, _ = response_logprobs(model, micro_inputs(batch, "cpu"), temperature=1.0)
    return replace(batch, logp_rollout_BT=logp * batch.mask_BT)


def resume_check(backend: Any, build: Callable[[], Any], ckpt: Path, parallel: DataParallel,
                 second: RolloutBatch) -> tuple[dict[str, float], dict[str, float], bool]:  # fmt: skip
    """Save `backend` into `ckpt`, train it on `second`, then a fresh backend (`build`) loaded from `ckpt` on the
    same batch: (the first's step metrics, the resumed one's, whether their weights are identical after)."""
    ckpt.mkdir(exist_ok=True)
    backend.save(ckpt)
    parallel.barrier()
    after = backend.train(second)
    after_weights = {n: t.clone() for n, t in backend.weights()[0].items()}  # unsplit ones are live parameters
    resumed = build()
    resumed.load(ckpt)
    again = resumed.train(second)
    again_weights = dict(resumed.weights()[0])
    return after, again, all(torch.equal(after_weights[n], again_weights[n]) for n in after_weights)
