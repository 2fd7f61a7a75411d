#!/usr/bin/env bash
# Create .venv and install wsi-lymph with everything it needs.
# torch: an existing torch (e.g. a CUDA build) is kept; where none is present the
# CPU build torch==2.13.0 is installed (override with TORCH_SPEC="torch==X.Y").
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
