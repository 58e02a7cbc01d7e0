"""What each rank of the Megatron backend holds, by layout: parameter, gradient and AdamW bytes after a step, the
activations one forward keeps for its backward, and the step's seconds, on this CPU over gloo (spawned here).

    python bench/bench_megatron_memory.py [--hidden 256] [--layers 4] [--tokens 256] [--layouts 1,tp2,pp2,cp2,moe,ep2]
        [--micro-batches 1]

Layouts: `1` one rank; `tp2` / `pp2` / `cp2` tensor, pipeline, context parallel over two ranks (dense Qwen3); `moe`
Qwen3-MoE (8 experts, top 2) on one rank, `ep2` its experts over two; `dp2` two data-parallel ranks, `zero2` the
same with the distributed optimizer (AdamW's state split over them, zero.py), `ep2zero` EP 2 with it. Every layout
trains the same batch of 4 groups x 4 samples of `--tokens` tokens (prompt 1/8 of them); two ranks each read half,
and a model-parallel group trains the union, an EP group's ranks their own half. Bytes are counted from the tensors
(not the allocator): parameters, gradients, AdamW's state. Activations: the tensors autograd saves during one
forward of the whole batch as one micro-batch on every rank (`saved_tensors_hooks`, each storage once, parameters
excluded), what the backward needs at its peak; an EP rank's experts then see both ranks' tokens. Seconds: the
median of three steps after a warm-up, each step's rows in `--micro-batches` micro-batches (CPU, informational: no
GPU figure here; with several, pipeline stages overlap: 1F1B).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.batch import RolloutBatch, collate
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.zero import ShardedAdamW
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

LAYOUTS = {  # name: (model kind, ranks, megatron sizes)
    "1": ("dense", 1, {}),
    "tp2": ("dense", 2, {"tensor_parallel": 2}),
    "pp2": ("dense", 2, {"pipeline_parallel": 2}),
    "cp2": ("dense", 2, {"context_parallel": 2}),
    "moe": ("moe", 1, {}),
    "ep2": ("moe", 2, {"expert_parallel": 2}),
    "dp2": ("dense", 2, {}),
    "zero2": ("dense", 2, {"distributed_optimizer": True}),
    "ep2zero": ("moe", 2, {"expert_parallel": 2, "distributed_optimizer": True}),
}


def make_batch(tokens: int) -> RolloutBatch:
    rng = np.random.default_rng(0)
    made = []
    for _ in range(4):
        g = synthetic_group(rng, n_samples=4, prompt_len=tokens // 8, response_len=tokens - tokens // 8, vocab=50)
        made.append(replace(g, samples=tuple(replace(s, reward=float(i % 2), logprobs=np.full(s.num_tokens, -3.0,
                                                                                             np.float32))
                                             for i, s in enumerate(g.samples))))  # fmt: skip
    return collate(made)


def activation_bytes(model: Any, batch: RolloutBatch) -> int:
    """Bytes of the tensors one forward saves for its backward (each storage once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = response_logprobs(model, micro_inputs(batch, "cpu"), temperature=1.0)
    del logp
    return sum(seen.values())


def measure(model_dir: str, parallel: DataParallel, sizes: dict[str, Any], tokens: int,
            micro: int) -> dict[str, Any]:  # fmt: skip
    cfg = TrainerConfig(model=model_dir, lr=1e-4, micro_batch_tokens=16 * tokens // micro, backend="megatron",
                        megatron=MegatronConfig(**sizes))  # fmt: skip
    backend: Any = build_backend(cfg, AlgoConfig(), temperature=1.0, parallel=parallel)
    whole = make_batch(tokens)
    per = whole.size // parallel.world
    share = whole.rows(list(range(parallel.rank * per, (parallel.rank + 1) * per)))
    backend.train(share)  # warm-up, and AdamW's state made
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        backend.train(share)
        seconds.append(time.perf_counter() - started)
    params = [p for p in backend.model.parameters()]
    optimizer = backend.policy.optimizer
    held = optimizer.owned_state() if isinstance(optimizer, ShardedAdamW) else optimizer.state
    return {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "adam": sum(v.numel() * v.element_size() for s in held.values() for v in s.values() if torch.is_tensor(v)),
        "activations": activation_bytes(backend.model, whole),  # every rank forwards the same micro-batch
        "step_s": statistics.median(seconds),
    }


def _rank(rank: int, world: int, port: int, model_dir: str, sizes: dict[str, Any], tokens: int, micro: int,
          out: str) -> None:  # fmt: skip
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel = DataParallel.from_env("cpu") if world > 1 else DataParallel()
    held = measure(model_dir, parallel, sizes, tokens, micro)
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
    parser.add_argument("--tokens", type=int, default=256, help="tokens a sample (prompt and response)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--micro-batches", type=int, default=1, help="a step's micro-batches (the 16 rows split)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shapes = {kind: TinyModelConfig(kind=kind, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                        num_kv_heads=4, intermediate_size=2 * args.hidden,
                                        max_position=4 * args.tokens) for kind in ("dense", "moe")}  # fmt: skip
        dirs = {kind: str(build_tiny_model(Path(tmp) / kind, shape)) for kind, shape in shapes.items()}
        for name in args.layouts.split(","):
            kind, world, sizes = LAYOUTS[name]
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = Path(tmp) / f"{name}.json"
            spawned = (world, port, dirs[kind], sizes, args.tokens, args.micro_batches, str(out))
            mp.start_processes(_rank, args=spawned, nprocs=world, start_method="spawn")
            results[name] = json.loads(out.read_text())
            one = "1" if kind == "dense" else "moe"
            base = results[one][0] if one in results else None
            for r, held in enumerate(results[name]):
                state = held["params"] + held["grads"] + held["adam"]
                line = (
                    f"{name:5s} rank {r}: params+grads+adam {state / 2**20:7.2f} MiB, activations "
                    f"{held['activations'] / 2**20:7.2f} MiB, step {held['step_s']:.3f} s"
                )
                if base is not None:
                    whole = base["params"] + base["grads"] + base["adam"]
                    ratio = held["activations"] / base["activations"]
                    line += f"  (state {state / whole:.2f}, activations {ratio:.2f} of one rank's)"
                print(line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
