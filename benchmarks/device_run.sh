#!/usr/bin/env bash
# The prepared GPU run (see benchmarks/device_run.py): from the project root on the GPU machine,
#   bash benchmarks/device_run.sh --out "$OUT"            (one H100/H200, about 9 minutes)
#   bash benchmarks/device_run.sh --out DIR --smoke       (CPU: tiny models, a few minutes)
# Where DeepSpeed or webdataset is missing and .whl/ holds the wheels (bash ../shared/device/prepare.sh
# --minilm --raw), they are installed into /tmp/site first, as ../shared/device/README.md does.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import deepspeed, webdataset" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "device_run: deepspeed / webdataset missing and no wheels in .whl/ (bash ../shared/device/prepare.sh)" >&2
    exit 2
  fi
fi
exec "$PYTHON" benchmarks/device_run.py "$@"
