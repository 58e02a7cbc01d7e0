"""Train-inference mismatch by precision: the native engine samples, the trainer scores the same tokens.

    python bench/bench_precision_mismatch.py [--kinds dense moe] [--prompts 16] [--new-tokens 32]
                                             [--dtype float32|bfloat16] [--main-params-dtype float32|bfloat16]
                                             [--init-std 0.1] [--pairs fp8:fp8 ...] [--json-out FILE]

For each tiny model (models/tiny.py, random weights at --init-std) and each (rollout.precision,
trainer precision) pair: the engine samples --new-tokens tokens (temperature 1, EOS ignored) for the same
--prompts prompts, one request at a time (max_batch 1, so the engine's argmax at each step can be read off a
hook on its output layer); then the trainer's policy, loaded as the trainer loads it (`load_policy`, which
applies trainer.precision / trainer.qat) scores those responses through its own logprob path. Reported over
every response token: mean |logp_trainer - logp_rollout|, k3 KL (mean of r - 1 - log r, r = p_trainer /
p_rollout, an estimate of KL(rollout || trainer) from the rollout's samples), and the share of tokens where the
trainer's argmax differs from the engine's. --dtype is rollout.dtype and trainer.dtype both; with bfloat16
the trainer computes under autocast over float32 master weights (its residual stream stays float32, the
engine's is bf16), unless --main-params-dtype bfloat16: then its parameters are bf16 and it computes as the
engine does, no autocast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.rollout import GenerationRequest, SamplingParams
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.torch.build import load_policy
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_hidden, response_logprobs

PAIRS = [("dtype", "dtype"), ("fp8", "dtype"), ("fp8", "fp8"), ("int4", "dtype"), ("int4", "int4")]


async def rollout(model_dir: str, precision: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> Any:
    """(responses, logprobs, the engine's argmax at each response token)."""
    engine = NativeEngine(model_dir, dtype=getattr(torch, dtype), max_batch=1, seed=0, precision=precision)  # type: ignore[arg-type]
    argmax: list[int] = []
    hook = engine.model.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: argmax.append(int(out[0, -1].argmax())))  # fmt: skip
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    try:
        results = await engine.generate([GenerationRequest(request_id=str(i), prompt_ids=p, params=params)
                                         for i, p in enumerate(prompts)])  # fmt: skip
    finally:
        hook.remove()
        await engine.close()
    assert len(argmax) == len(prompts) * new_tokens  # one forward per token, rows one after the other
    return [r.response_ids for r in results], [r.logprobs for r in results], np.array(argmax).reshape(len(prompts), -1)


def score(model_dir: str, trainer: str, dtype: str, main: str, prompts: list[list[int]], responses: list[Any]) -> Any:
    """The trainer's (logp [B, T], argmax [B, T]) of the responses, through its logprob path."""
    precision, qat = {"fp8": ("fp8", "none"), "int4": ("dtype", "int4")}.get(trainer, ("dtype", "none"))
    config = TrainerConfig(model=model_dir, dtype=dtype, main_params_dtype=main, precision=precision, qat=qat)  # type: ignore[arg-type]
    model = load_policy(config).eval()
    n, t = len(responses), len(responses[0])
    batch = RolloutBatch([np.asarray(p, np.int32) for p in prompts], list(responses), torch.zeros(n, t),
                         torch.ones(n, t), torch.zeros(n), torch.arange(n))  # fmt: skip
    x = micro_inputs(batch, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.params_dtype != dtype)
    with torch.no_grad(), autocast:
        logp, _ = response_logprobs(model, x, temperature=1.0)
        argmax = model.get_output_embeddings()(response_hidden(model.base_model, x)).argmax(-1)
    return logp.float(), argmax


def measure(model_dir: str, rollout_precision: str, trainer: str, dtype: str, main: str, prompts: list[list[int]],
            new_tokens: int) -> dict[str, float]:  # fmt: skip
    responses, logps, engine_argmax = asyncio.run(rollout(model_dir, rollout_precision, dtype, prompts, new_tokens))
    logp_t, argmax_t = score(model_dir, trainer, dtype, main, prompts, responses)
    logp_r = torch.tensor(np.stack(logps))
    diff = logp_t - logp_r
    return {
        "mean_abs_dlogp": float(diff.abs().mean()),
        "k3_kl": float((diff.exp() - 1 - diff).mean()),
        "argmax_differs": float((argmax_t.numpy() != engine_argmax).mean()),
        "tokens": float(diff.numel()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--main-params-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--init-std", type=float, default=0.1)
    parser.add_argument("--pairs", nargs="+", default=[f"{r}:{t}" for r, t in PAIRS], help="rollout:trainer")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 50, 8).tolist() for _ in range(args.prompts)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            model_dir = str(build_tiny_model(f"{tmp}/{kind}", TinyModelConfig(kind=kind, init_std=args.init_std)))
            for r, t in (pair.split(":") for pair in args.pairs):
                started = time.perf_counter()
                row = {"model": kind, "rollout": r, "trainer": t, "dtype": args.dtype, "main": args.main_params_dtype}
                row |= measure(model_dir, r, t, args.dtype, args.main_params_dtype, prompts, args.new_tokens)
                row["seconds"] = round(time.perf_counter() - started, 2)
                rows.append(row)
                dlogp, k3, differs = row["mean_abs_dlogp"], row["k3_kl"], row["argmax_differs"]
                print(f"{kind:5} rollout {r:5} trainer {t:5} | mean|dlogp| {dlogp:.2e} k3 {k3:.2e} "
                      f"argmax differs {differs:.4f} ({row['seconds']} s)")  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
