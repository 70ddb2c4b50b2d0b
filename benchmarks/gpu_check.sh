#!/usr/bin/env bash
# The GPU check (issue: mixed precision): on a CUDA machine, the device tests and B1 / B3 in float32
# and AMP, as JSON lines; the last line {"gpu_check": ...} is the summary. About 8 minutes at most.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (project installed: make install)
#   bash benchmarks/gpu_check.sh --device cpu --quick   # dry run on CPU: proves the script works
#
# Python: $PYTHON, else the project's .venv, else python3. Exit status 0 when every test passed and
# every workload ran. Details: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
