#!/usr/bin/env bash
# The GPU figures the README quotes, re-measured in one call (issue 38): the engine (tokens/s, Qwen3-0.6B
# shape), the fused logprob kernel against full logits, the RL train step (MFU), and the pipeline (async and
# sync, CUDA-IPC weights). Each runs at the shape its docs/benchmarks.md table names; each has a time limit, so
# the whole stays under ten minutes on an H100 or H200. Writes OUT/<name>.json, OUT/<name>.log and
# OUT/suite.json (every run's exit code, seconds, and its JSON).
#   bash bench/gpu_suite.sh [OUT]       (OUT: bench/results/gpu-suite)
# Packages the GPU image lacks come from ./.whl, as for ops/gpu-test.sh (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu-suite}
mkdir -p "$out"
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/miles-stream-site
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: the GPU suite needs one')" || exit 2
: >"$out/runs.jsonl"

run() {  # name, seconds allowed, script and its arguments
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$python" "$@" --json-out "$out/$name.json" >"$out/$name.log" 2>&1
  rc=$?
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - start)), \"command\": \"python $*\"}" >>"$out/runs.jsonl"
}

run engine 150 bench/bench_engine.py                      # 128 prompts x 256 + 256 new tokens (the table's shape)
run kernels 90 bench/bench_kernels.py                     # 16,384 tokens, hidden 1024, vocab 151,936
run train_step 180 bench/bench_train_step.py --params-dtype bfloat16 --cases fused-16k-compile,fused-16k
run train_step_megatron 150 bench/bench_train_step.py --params-dtype bfloat16 --backend megatron \
  --cases fused-4k,fused-16k,packed-16k                   # the same shape through Megatron-core's GPTModel (issue 22)
run pipeline 180 bench/bench_pipeline.py --case gpu --transport cuda_ipc --steps 10 --warmup 3 --modes async,sync \
  --samples-per-group 8

"$python" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
for r in runs:
    f = out / f"{r['name']}.json"
    r["result"] = json.loads(f.read_text()) if f.exists() else None
(out / "suite.json").write_text(json.dumps(runs, indent=1))
print(json.dumps([{k: r[k] for k in ("name", "rc", "seconds")} for r in runs]))
PY
