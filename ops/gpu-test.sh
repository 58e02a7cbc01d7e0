#!/usr/bin/env bash
# The GPU test tier (`pytest -m gpu`) on a machine that has CUDA and PyTorch already (a GPU image): no venv and
# no download. The project runs from this checkout; packages the machine lacks come from ./.whl when that
# folder holds wheels (docs/gpu.md says which, and how to fetch them on a machine with an index).
#   bash ops/gpu-test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/miles-stream-site
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: the GPU tier needs one')"
exec "$python" -m pytest -m gpu -p no:cacheprovider "$@" tests
