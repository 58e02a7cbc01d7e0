"""Native engine versus Hugging Face `generate()` on a GPU, same model and workload, one process.

    python bench/bench_engine.py [--prompts 128] [--prompt-len 256] [--new-tokens 256] [--json-out FILE]

The model: Qwen3-0.6B's shape (28 layers, hidden 1024, 16 query / 8 KV heads, head dim 128, vocabulary
151,936), random weights, bf16, saved to a temporary directory and loaded by both. Every prompt gets exactly
`--new-tokens` tokens (EOS ignored), sampled at temperature 1 without top-k/top-p. tokens/s = new tokens /
wall time of the whole call, after a warm-up call (which captures the engine's CUDA graphs). Also: the time to
apply a new weight version to the running engine (from CPU tensors, as a transport delivers them, and from GPU
tensors), peak GPU memory, and the memory-bandwidth bound of the decode (weights + the KV cache read once per
step, at the copy bandwidth measured here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.rollout import GenerationRequest, SamplingParams

SHAPE = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
         "tie_word_embeddings": True}  # fmt: skip


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - t)


async def run_engine(
    path: str, prompts: list[list[int]], new: int, state: dict[str, torch.Tensor], profile: str = "",
    compile_decode: bool = True,
) -> dict[str, Any]:  # fmt: skip
    engine = NativeEngine(path, device="cuda", dtype=torch.bfloat16, max_batch=len(prompts),
                          max_seq_len=len(prompts[0]) + new, kv_cache="static",
                          compile_decode=compile_decode)  # fmt: skip
    t = time.perf_counter()
    params = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True)
    requests = [GenerationRequest(request_id=f"r{i}", prompt_ids=p, params=params) for i, p in enumerate(prompts)]
    await engine.generate(requests)  # warm-up: compiles and captures the graphs
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    results = await engine.generate(requests)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    made = sum(len(r.response_ids) for r in results)
    cpu_state = {k: v.cpu() for k, v in state.items()}
    update_s = {}
    for where, weights in (("from_cpu", cpu_state), ("from_gpu", state)):
        t = time.perf_counter()
        await engine.update_weights(engine.weight_version + 1, weights)
        torch.cuda.synchronize()
        update_s[where] = time.perf_counter() - t
    if profile:
        short = [GenerationRequest(request_id=r.request_id, prompt_ids=r.prompt_ids,
                                   params=SamplingParams(temperature=1.0, max_new_tokens=64, ignore_eos=True))
                 for r in requests]  # fmt: skip
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            t = time.perf_counter()
            await engine.generate(short)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        text = f"wall {wall * 1e3:.1f} ms, {len(short)} x 64 tokens\n{table}"
        await asyncio.to_thread(Path(profile).write_text, text)
    (after,) = await engine.generate(requests[:1])  # the graphs still run after the updates
    assert len(after.response_ids) == new
    cache = engine._static.cache_bytes if engine._static is not None else 0
    await engine.close()
    return {"tokens": made, "seconds": elapsed, "tokens_per_s": made / elapsed, "update_s": update_s,
            "kv_cache_gib": cache / 2**30, "warmup_s": warmup_s,
            "compiled": bool(engine._static is not None and engine._static._compiled)}  # fmt: skip


def run_hf(model: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    ids = torch.tensor(prompts, device="cuda")
    kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": new,
              "min_new_tokens": new, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}  # fmt: skip
    warm = {**kwargs, "max_new_tokens": 8, "min_new_tokens": 8, "attention_mask": torch.ones_like(ids[:8])}
    model.generate(ids[:8], **warm)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    made = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tokens": made, "seconds": elapsed, "tokens_per_s": made / elapsed}


def main() -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="eager decode step (still in CUDA graphs)")
    parser.add_argument("--profile", default="", help="write a profile of a 64-token run of the engine here")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**SHAPE), dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.cuda().eval()
    prompts = torch.randint(0, SHAPE["vocab_size"], (args.prompts, args.prompt_len)).tolist()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "prompts": args.prompts,
                              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not args.skip_hf:
            with torch.no_grad():
                result["hf_generate"] = run_hf(model, prompts, args.new_tokens)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result["native"] = asyncio.run(run_engine(tmp, prompts, args.new_tokens, state, args.profile,
                                                   not args.no_compile))  # fmt: skip
        result["native"]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # bound: each decode step reads the weights and, per row, the KV cache so far (mean length over the run)
    bandwidth = copy_bandwidth()
    per_token_kv = 2 * SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * SHAPE["head_dim"] * 2
    mean_len = args.prompt_len + args.new_tokens / 2
    step_bytes = weight_bytes + args.prompts * mean_len * per_token_kv
    bound = args.prompts / (step_bytes / bandwidth)
    result.update({"copy_bandwidth_tb_s": bandwidth / 1e12, "bandwidth_bound_tokens_per_s": bound})
    native = result["native"]["tokens_per_s"]
    print(json.dumps(result, indent=1))
    print(f"\n{result['device']}: {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new each")
    if "hf_generate" in result:
        hf = result["hf_generate"]["tokens_per_s"]
        print(f"HF generate()  {hf:10.0f} tokens/s")
        print(f"native engine  {native:10.0f} tokens/s   {native / hf:.1f}x generate()")
    else:
        print(f"native engine  {native:10.0f} tokens/s")
    print(f"bandwidth bound {bound:9.0f} tokens/s ({bandwidth / 1e12:.2f} TB/s copy): native at {native / bound:.0%}")
    print(f"weight update: {result['native']['update_s']}; peak GPU memory {result['native']['peak_gib']:.1f} GiB")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
