"""Native engine tokens/s on CPU for the tiny models, next to Hugging Face generate() on the same batch.

    python bench/bench_engine_cpu.py [--batch 32] [--prompt-len 16] [--new-tokens 64] [--json-out FILE]

Both sample at temperature 1 with EOS ignored, so every row makes exactly --new-tokens tokens. generate()
gets the whole batch left-padded at once; the native engine gets the same requests with max_batch = batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.rollout import GenerationRequest, SamplingParams

SIZES = {
    "tiny-dense": TinyModelConfig(kind="dense"),
    "tiny-moe": TinyModelConfig(kind="moe"),
    "small-dense": TinyModelConfig(
        kind="dense", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=768
    ),
}


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # fmt: skip
        elapsed = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / elapsed


async def native(model_dir: str, prompts: list[list[int]], new_tokens: int) -> float:
    engine = NativeEngine(model_dir, max_batch=len(prompts), seed=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [GenerationRequest(request_id=str(i), prompt_ids=p, params=params) for i, p in enumerate(prompts)]
    await engine.generate(reqs[:2])  # warm-up
    t = time.perf_counter()
    results = await engine.generate(reqs)
    elapsed = time.perf_counter() - t
    await engine.close()
    assert all(len(r.response_ids) == new_tokens for r in results)
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"torch_threads": torch.get_num_threads(), **vars(args)}
    for name, config in SIZES.items():
        model_dir = build_tiny_model(tempfile.mkdtemp(), config)
        vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
        prompts = torch.randint(4, vocab, (args.batch, args.prompt_len)).tolist()
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        hf_generate(model, prompts[:2], 4)  # warm-up
        hf = hf_generate(model, prompts, args.new_tokens)
        ours = asyncio.run(native(str(model_dir), prompts, args.new_tokens))
        params = sum(p.numel() for p in model.parameters())
        results[name] = {"params": params, "hf_generate_tok_s": hf, "native_tok_s": ours, "ratio": ours / hf}
        print(f"{name:12s} {params / 1e6:6.2f}M params  HF generate {hf:8.0f} tok/s  native {ours:8.0f} tok/s  "
              f"ratio {ours / hf:.2f}")  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
