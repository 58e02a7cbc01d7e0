"""Token logprobs + entropy from hidden states: full float32 logits (naive) versus `miles_stream.kernels`.

    python bench/bench_kernels.py [--tokens 16384] [--hidden 1024] [--vocab 151936] [--json-out FILE]

On CUDA (bf16 inputs, as a bf16 trainer has them): forward time and extra memory, forward + backward time,
for both, in one process, plus the error of each against a float64 computation on a slice of the tokens.
Times are medians of CUDA-event-timed repeats after warm-up; "extra memory" is the peak allocated during the
call minus what was allocated before it (inputs and weights not counted). The floor: the output-layer matmul
(2 N D V flops) at the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch

from miles_stream.kernels import naive_token_logprobs, token_logprobs


def timed(fn: Callable[[], Any], repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats`, CUDA-event timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def extra_memory_gib(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**30


def matmul_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = timed(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    n, d, v, t = args.tokens, args.hidden, args.vocab, args.temperature
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(v, d, device="cuda", generator=g) * (3 / d**0.5)).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    up = torch.randn(2, n, device="cuda", generator=g)

    def forward(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn(hidden, weight, targets, temperature=t)

        return run

    def forward_backward(fn: Callable[..., Any]) -> Callable[[], Any]:
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)

        def run() -> Any:
            h.grad = w.grad = None
            logp, entropy = fn(h, w, targets, temperature=t)
            ((logp * up[0]).sum() + (entropy * up[1]).sum()).backward()
            return h.grad, w.grad

        return run

    rows: dict[str, dict[str, float]] = {}
    ref_slice = slice(0, 512)
    h64, w64 = hidden[ref_slice].double(), weight.double()
    ref_logp, ref_entropy = naive_token_logprobs(h64, w64, targets[ref_slice], temperature=t)
    for name, fn in (("naive (float32 logits)", naive_token_logprobs), ("miles_stream.kernels", token_logprobs)):
        row: dict[str, float] = {}
        logp, entropy = forward(fn)()
        row["logp_rel_err"] = float((logp[ref_slice].double() - ref_logp).norm() / ref_logp.norm())
        row["entropy_rel_err"] = float((entropy[ref_slice].double() - ref_entropy).norm() / ref_entropy.norm())
        try:
            row["forward_ms"] = timed(forward(fn))
            row["forward_extra_gib"] = extra_memory_gib(forward(fn))
            row["fwd_bwd_ms"] = timed(forward_backward(fn), repeats=5)
            row["fwd_bwd_extra_gib"] = extra_memory_gib(forward_backward(fn))
        except torch.OutOfMemoryError as exc:
            row["oom"] = 1.0
            print(f"{name}: out of memory: {exc}")
        rows[name] = row
        torch.cuda.empty_cache()
    rate = matmul_tflops()
    floor_ms = 2 * n * d * v / rate / 1e9
    result = {"device": torch.cuda.get_device_name(), "tokens": n, "hidden": d, "vocab": v, "temperature": t,
              "matmul_tflops": rate, "forward_floor_ms": floor_ms, "rows": rows}  # fmt: skip
    print(json.dumps(result, indent=1))
    print(f"\n{result['device']}: N={n} D={d} V={v}; bf16 matmul {rate:.0f} TFLOP/s, forward floor {floor_ms:.2f} ms")
    print(f"{'path':<26}{'fwd ms':>9}{'fwd GiB':>9}{'fwd+bwd ms':>12}{'f+b GiB':>9}{'logp err':>10}{'ent err':>10}")
    for name, r in rows.items():
        print(f"{name:<26}{r.get('forward_ms', float('nan')):>9.2f}{r.get('forward_extra_gib', float('nan')):>9.2f}"
              f"{r.get('fwd_bwd_ms', float('nan')):>12.2f}{r.get('fwd_bwd_extra_gib', float('nan')):>9.2f}"
              f"{r['logp_rel_err']:>10.1e}{r['entropy_rel_err']:>10.1e}")  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
