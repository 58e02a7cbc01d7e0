"""FP8 blockwise GEMM against bf16 on one GPU (kernels/fp8.py), per linear-layer shape.

    python bench/bench_fp8_gemm.py [--shapes 4096x4096 4096x12288 12288x4096] [--rows 1 16 256 4096] [--json-out FILE]

For each weight [N, K] and each row count M: the median time of bf16 `F.linear`; of `fp8_matmul` alone (the
cuBLAS blockwise-scaled GEMM on operands already quantized); and of `fp8_linear` (the activation's 1x128
quantization, in plain PyTorch ops, then the GEMM: what the engine's FP8 layer runs). Also checks the GEMM
against the float reference. CUDA only (`--help` elsewhere).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from miles_stream.kernels.fp8 import (
    dequantize_activation,
    dequantize_weight,
    fp8_linear,
    fp8_matmul,
    quantize_activation,
    quantize_weight,
)


def timed(fn: Callable[[], object], reps: int = 50) -> float:
    """Median milliseconds of `fn` over `reps` runs after 5 warm-ups, by CUDA events."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "12288x4096", "4096x12288"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 256, 4096])
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda") / k**0.5
        wq, ws = quantize_weight(w)
        wb = w.bfloat16()
        for m in args.rows:
            x = torch.randn(m, k, device="cuda").bfloat16()
            xq, xs = quantize_activation(x)
            out = fp8_matmul(xq, xs, wq, ws, out_dtype=torch.bfloat16).float()
            ref = dequantize_activation(xq, xs) @ dequantize_weight(wq, ws).T
            err = float(((out - ref).abs() / (ref.abs() + 1e-2)).max())
            bf16 = timed(lambda: F.linear(x, wb))  # noqa: B023
            gemm = timed(lambda: fp8_matmul(xq, xs, wq, ws, out_dtype=torch.bfloat16))  # noqa: B023
            linear = timed(lambda: fp8_linear(x, wq, ws))  # noqa: B023
            row = {"n": n, "k": k, "m": m, "bf16_ms": bf16, "fp8_gemm_ms": gemm, "fp8_linear_ms": linear,
                   "max_rel_err_vs_reference": err}  # fmt: skip
            rows.append(row)
            print(f"[{n}x{k}] M={m:5}  bf16 {bf16:.4f} ms  fp8 GEMM {gemm:.4f} ms ({bf16 / gemm:.2f}x)  "
                  f"fp8 linear {linear:.4f} ms ({bf16 / linear:.2f}x)  max rel err {err:.1e}")  # fmt: skip
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(info))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), **info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
