"""A training step of a Qwen3-0.6B-shaped model with the full RL loss, through `PolicyTrainer`, on one GPU.

    python bench/bench_train_step.py [--steps 5] [--json-out FILE] [--cases naive-4k,fused-16k,...]
                                     [--backend torch|megatron]
    python bench/bench_train_step.py --device cpu --shape tiny --groups 1 --samples 2 --prompt-len 8 \
        --response-len 8 --steps 1 --cases fused-4k          # the plumbing, on CPU, in seconds

The model: Qwen3-0.6B's shape (28 layers, hidden 1024, 16 query / 8 KV heads, head dim 128, MLP 3072, vocabulary
151,936, tied embeddings), random weights, SDPA attention; on CUDA bf16 compute over bf16 parameters (`--dtype`,
`--params-dtype`: said explicitly, since `trainer.dtype` defaults to float32, which ran out of memory at this
shape on an 80 GB H100). One rollout batch of groups whose samples are 256 prompt + 1,792 response tokens; GRPO
advantages, PPO clip, TIS against synthetic behaviour logprobs, entropy bonus; AdamW. Each case runs the same
batch with a micro-batch token budget and the logprob path named (fused: `kernels.token_logprobs`; naive: full
float32 logits), optionally with activation checkpointing. A case that runs out of memory is reported as such.

MFU = model flops per step / step time / peak bf16 matmul rate, with model flops counted as PaLM does:
6 x parameters x tokens + 12 x layers x heads x head_dim x sequence length x tokens (attention, not halved
for causality); the tied embedding counts once (it is the output layer's matmul). The peak rate is measured
here (an 8192^3 bf16 matmul), not the datasheet's; on CPU there is no MFU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from miles_stream.testing.synthetic import synthetic_group
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.batch import collate
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.policy import PolicyTrainer, set_activation_checkpointing

SHAPE = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
         "tie_word_embeddings": True, "rope_theta": 1_000_000.0}  # fmt: skip
SHAPES = {
    "qwen3-0.6b": SHAPE,
    # 2 layers, hidden 64: the CPU case, to check the plumbing (model load, config keys, a step) in seconds
    "tiny": {**SHAPE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096},
}  # fmt: skip
CASES = {  # name: (micro-batch tokens, fused, activation checkpointing, compiled layers, packed, attention)
    "naive-4k": (4096, False, False, False, False, "sdpa"),
    "naive-16k": (16384, False, False, False, False, "sdpa"),
    "fused-4k": (4096, True, False, False, False, "sdpa"),
    "fused-16k": (16384, True, False, False, False, "sdpa"),
    "fused-16k-ckpt": (16384, True, True, False, False, "sdpa"),
    "fused-32k-ckpt": (32768, True, True, False, False, "sdpa"),
    "fused-16k-compile": (16384, True, False, True, False, "sdpa"),
    "packed-16k": (16384, True, False, False, True, "sdpa"),  # packed: the trainer switches to kernels/packed_
    "packed-16k-compile": (16384, True, False, True, True, "sdpa"),  # attention (varlen flash)
}


def build_model(shape: dict[str, Any], device: str, params_dtype: str) -> Any:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, params_dtype), attn_implementation="sdpa")
    return model.to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_batch(groups: int, samples: int, prompt_len: int, response_len: int, vocab: int, vary: bool) -> Any:
    """Responses of `response_len` tokens, or with `vary` of uniformly random lengths up to it (as RL has)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(groups):
        g = synthetic_group(rng, n_samples=samples, prompt_len=prompt_len, response_len=response_len, vocab=vocab)
        cut = [int(rng.integers(response_len // 8, response_len + 1)) if vary else response_len for _ in g.samples]
        out.append(
            replace(
                g,
                samples=tuple(
                    replace(
                        s,
                        response_ids=s.response_ids[:k],
                        logprobs=np.full(k, -3.0, np.float32),  # near a random
                        loss_mask=s.loss_mask[:k],
                    )
                    for s, k in zip(g.samples, cut, strict=True)
                ),
            )
        )  # model's: sane TIS
    return collate(out)


def peak_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12


def run_case(model: Any, batch: Any, name: str, args: argparse.Namespace, profile: str = "") -> dict[str, Any]:
    budget, fused, ckpt, compiled, packed, attention = CASES[name]
    if args.backend == "torch" and getattr(model.config, "_attn_implementation", None) != attention:
        model.set_attn_implementation(attention)
    # every key that decides what is measured is set here, none inherited from TrainerConfig's defaults
    algo = AlgoConfig(tis_mode="truncate", entropy_coef=0.001)
    trainer: Any
    try:
        config = TrainerConfig(device=args.device, dtype=args.dtype, main_params_dtype=args.params_dtype, lr=1e-6,
                               micro_batch_tokens=budget, fused_logprobs=fused, activation_checkpointing=ckpt,
                               compile=compiled, pack_sequences=packed, backend=args.backend,
                               model=args.checkpoint or "")  # fmt: skip
        if args.backend == "megatron":  # Megatron's GPTModel built from the same weights, saved as a checkpoint
            trainer = build_backend(config, algo, temperature=1.0, parallel=DataParallel())
        else:
            trainer = PolicyTrainer(model, config, algo, temperature=1.0)
    except Exception as exc:  # a case the backend refuses (activation checkpointing, compile): reported
        return {"case": name, "error": repr(exc)[:300]}
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train(batch)  # warm-up
        synchronize(args.device)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            trainer.train(batch)
            synchronize(args.device)
            times.append(time.perf_counter() - t)
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                trainer.train(batch)
                torch.cuda.synchronize()
            with open(profile, "w") as f:
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    except torch.OutOfMemoryError:
        return {"case": name, "oom": True}
    except Exception as exc:  # a case that does not run here (e.g. an attention backend): reported, not fatal
        return {"case": name, "error": repr(exc)[:300]}
    finally:
        if ckpt and args.backend == "torch":
            set_activation_checkpointing(model, False)
        del trainer
    step_s = float(np.median(times))
    return {"case": name, "micro_batch_tokens": budget, "fused": fused, "activation_checkpointing": ckpt,
            "compiled": compiled, "packed": packed, "attention": attention, "step_s": step_s,
            "tokens_per_s": sum(batch.lengths) / step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="trainer.dtype; default bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--params-dtype", choices=["bfloat16", "float32"],
                        help="trainer.main_params_dtype, what the weights and Adam's state are held in; default "
                             "--dtype (the published figures: bf16 parameters)")  # fmt: skip
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=1792)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--vary", action="store_true", help="response lengths uniform in [len/8, len]")
    parser.add_argument("--json-out")
    parser.add_argument("--profile", default="", help="write a CUDA profile of one step of the first case here")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "megatron"],
        help="megatron: the same weights as Megatron-core's GPTModel (trainer.backend megatron)",
    )
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.params_dtype = args.params_dtype or args.dtype
    shape = SHAPES[args.shape]
    model = build_model(shape, args.device, args.params_dtype)
    params = sum(p.numel() for p in model.parameters())  # tied embedding once
    workdir = tempfile.TemporaryDirectory()
    args.checkpoint = ""
    if args.backend == "megatron":  # the same random weights, as the checkpoint the backend converts
        model.save_pretrained(workdir.name)
        args.checkpoint = workdir.name
        model = model.to("meta")  # the backend builds its own
    batch = make_batch(args.groups, args.samples, args.prompt_len, args.response_len, shape["vocab_size"], args.vary)
    tokens = sum(batch.lengths)  # real tokens: padding is not counted
    attn = 12 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"]
    flops = 6 * params * tokens + attn * sum(n * n for n in batch.lengths)  # attention per sequence
    peak = peak_tflops() if args.device == "cuda" else float("nan")
    results = []
    for i, name in enumerate(args.cases.split(",")):
        r = run_case(model, batch, name, args, args.profile if i == 0 else "")
        if "step_s" in r:
            r["mfu"] = flops / r["step_s"] / (peak * 1e12)
        results.append(r)
        print(json.dumps(r), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    summary = {"device": device, "backend": args.backend, "shape": args.shape, "dtype": args.dtype,
               "params_dtype": args.params_dtype,
               "params": params, "tokens_per_step": tokens, "model_tflop_per_step": flops / 1e12,
               "peak_bf16_tflops": peak, "results": results}  # fmt: skip
    print(f"\n{summary['device']}: {params / 1e6:.0f}M params, {tokens} tokens/step ({batch.size} sequences), "
          f"{flops / 1e12:.1f} model TFLOP/step, measured bf16 peak {peak:.0f} TFLOP/s")  # fmt: skip
    print(f"{'case':<16}{'step s':>9}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}")
    for r in results:
        if "step_s" not in r:
            print(f"{r['case']:<16}  {'out of memory' if r.get('oom') else r.get('error')}")
        else:
            print(f"{r['case']:<16}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['mfu']:>7.1%}{r['peak_gib']:>10.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
