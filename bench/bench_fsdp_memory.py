"""Parameter + gradient + AdamW bytes each rank holds: the policy replicated on one rank, then sharded by
trainer.fsdp over N gloo ranks on this CPU (spawned here), after one optimizer step on the same batch.

    python bench/bench_fsdp_memory.py --hidden 256 --layers 4 --ranks 2

Bytes are counted from the tensors themselves (a DTensor's local shard), not from the allocator: what FSDP
keeps per rank between steps. Activations and the gathered layers of a forward pass are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.config import FsdpConfig, TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.build import build_trainer


def batch(groups: int) -> RolloutBatch:
    rng = np.random.default_rng(0)
    made = []
    for _ in range(groups):
        g = synthetic_group(rng, n_samples=4, prompt_len=6, response_len=8, vocab=50)
        made.append(replace(g, samples=tuple(replace(s, reward=float(i % 2)) for i, s in enumerate(g.samples))))
    return collate(made)


def held_bytes(trainer: Any) -> dict[str, int]:
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(trainer.model.parameters())
    return {
        "params": sum(local(p) for p in params),
        "grads": sum(local(p.grad) for p in params if p.grad is not None),
        "adam": sum(local(v) for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }


def step_and_measure(model_dir: str, parallel: DataParallel, groups: int) -> dict[str, int]:
    cfg = TrainerConfig(model=model_dir, lr=1e-4, fsdp=FsdpConfig(enabled=parallel.world > 1))
    trainer = build_trainer(cfg, AlgoConfig(), temperature=1.0, parallel=parallel)
    whole = batch(groups)
    per = whole.size // parallel.world
    trainer.train(whole.rows(list(range(parallel.rank * per, (parallel.rank + 1) * per))))
    return held_bytes(trainer)


def _rank(rank: int, world: int, port: int, model_dir: str, groups: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel = DataParallel.from_env("cpu")
    held = step_and_measure(model_dir, parallel, groups)
    every = parallel.gather(held)
    if parallel.is_main:
        Path(out).write_text(json.dumps(every))
    parallel.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown sometimes aborts (tests/unit/test_trainer.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    groups = 2 * args.ranks
    with tempfile.TemporaryDirectory() as tmp:
        shape = TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=2 * args.hidden)
        model_dir = str(build_tiny_model(Path(tmp) / "model", shape))
        one = step_and_measure(model_dir, DataParallel(), groups)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path(tmp) / "ranks.json"
        mp.start_processes(_rank, args=(args.ranks, port, model_dir, groups, str(out)), nprocs=args.ranks,
                           start_method="spawn")  # fmt: skip
        ranks = json.loads(out.read_text())
    total = sum(one.values())
    print(json.dumps({"shape": {"hidden": args.hidden, "layers": args.layers, "ranks": args.ranks},
                      "one_rank": one | {"total": total},
                      "fsdp_ranks": [r | {"total": sum(r.values()), "fraction": round(sum(r.values()) / total, 4)}
                                     for r in ranks]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
