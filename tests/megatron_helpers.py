"""Batches and a resume check shared by the Megatron backend's tests (tests/unit/test_megatron_*.py).

Every batch: four groups of four samples of varied lengths (the pad id, token 0, among the tokens), rewards 0/1,
behaviour logprobs the HF model's own at temperature 1.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.megatron.convert import iter_hf
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


def spawn_ranks(worker: Callable[..., None], world: int, out: Path | str, *args: Any) -> list[dict[str, Any]]:
    """Run `worker(rank, world, port, *args)` on `world` spawned gloo ranks (rendezvous on a free local port) and
    load what each rank saved at `{out}.{rank}`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, *args), nprocs=world, start_method="spawn")
    outputs: list[dict[str, Any]] = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    return outputs


def join_ranks(rank: int, world: int, port: int) -> DataParallel:
    """A spawned worker's side of `spawn_ranks`: this rank in the gloo group, one thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return DataParallel.from_env("cpu")


def leave_ranks(parallel: DataParallel) -> None:
    """A spawned worker's end, once it saved its results: wait for the others, then exit without gloo's teardown,
    which sometimes aborts (tests/unit/test_trainer.py says when)."""
    parallel.barrier()
    sys.stdout.flush()
    os._exit(0)


def assert_weights_close(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Published weights after a step on several ranks against one rank's: the same names in the same order, every
    element within 5e-5 and all but at most 4 within 1e-5. AdamW's first step moves an element by lr x g / (|g| +
    eps): where g is near 0, float noise between two sums of the same gradient moves it by more than 1e-5 (seen
    with TP 2 x PP 2: 1 of 8192, 1.4e-5, 1.4% of the step)."""
    assert list(got) == list(want)
    far = 0
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=5e-5, rtol=0, msg=name)
        far += int(((got[name] - tensor).abs() > 1e-5).sum())
    assert far <= 4, far


def assert_joins(shards_of: Callable[[str], Any], shape: Any, state: Mapping[str, torch.Tensor]) -> None:
    """The split tensors (`shards_of`, as the layout reads them) join back into `state`, the HF state dict: the
    same names in the same order, every tensor bit-equal."""
    back = dict(iter_hf(shards_of, shape))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def one_rank_step(single: Any, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], Any]:
    """One rank's reference on `batch`: (logprobs, entropy) of a no-grad forward at temperature 1, then the metrics
    of one training step on it and the weights it publishes after."""
    with torch.no_grad():
        logp, entropy = response_logprobs(single.model, micro_inputs(batch, "cpu"), temperature=1.0)
    metrics = single.train(batch)
    published, _ = single.weights()
    return logp, entropy, metrics, published


def own_routes(hf: Any, batch: RolloutBatch) -> np.ndarray:
    """[b, width, layers, K] uint8: the experts the HF MoE model's own routers choose for every token of `batch`'s
    padded rows (a routing trace that replays to no mismatch)."""
    from miles_stream.models.moe import moe_routers

    seen: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _a, out: seen.append(out[2])) for r in moe_routers(hf)]
    x = micro_inputs(batch, "cpu")
    try:
        with torch.no_grad():
            hf(input_ids=x.input_ids)
    finally:
        for h in hooks:
            h.remove()
    b, width = x.input_ids.shape
    return torch.stack(seen, dim=1).view(b, width, len(seen), -1).numpy().astype(np.uint8)
