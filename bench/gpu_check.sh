#!/usr/bin/env bash
# One short GPU check (see bench/gpu_check.py): run on a CUDA machine from the repository root.
# .whl/ holds wheels of what that machine's Python lacks (dask, distributed, zarr, openslide...);
# .device/ holds the inputs (an annotated crop, the CMU-1 sample slide, the paper's Caffe models).
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD  # the repository too: the local cluster's worker processes import wsi_lymph
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --data "${GPU_CHECK_DATA:-.device}" --out "${OUT:-gpu-check-out}" "$@"
