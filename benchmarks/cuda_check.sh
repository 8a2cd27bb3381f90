#!/usr/bin/env bash
# The CUDA path, checked on a GPU machine (CI has none): offline install, the CUDA tests,
# then the default job and the EIO smoke benchmark on the GPU.
# Usage (repo root, on the GPU machine): OUT=/some/dir bash benchmarks/cuda_check.sh
# Offline machines: put the torchattacks wheel in .whl/ and Fashion-MNIST's idx files in .data/fashion-mnist/.
set -euo pipefail
OUT=${OUT:-/tmp/robench-cuda-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
if [ -d .data ]; then export ROBENCH_DATA=$PWD/.data; fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_eio.py tests/test_runner.py tests/test_transfer_runner.py 2>&1 | tail -4
run() {  # name, then robench run arguments
  local name=$1 start=$SECONDS
  shift
  robench run "$@" --device cuda --out "$OUT/$name" --cache-dir /tmp/robench-cache 2>"$OUT/$name.log"
  echo "$name wall seconds: $((SECONDS - start))"
}
run default --defense baseline --defense advt --attack pgd
run eio-fashion-smoke benchmarks/eio-fashion-smoke.toml
