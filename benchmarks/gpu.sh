#!/usr/bin/env bash
# The GPU path on a machine with a CUDA GPU, in under 5 minutes: the `cuda` tests, then the overhead
# benchmark on the GPU (quick mode; absolute µs/step only mean something there).
#
#   bash benchmarks/gpu.sh                  # from the repository root
#   PYTHON=/opt/conda/bin/python bash benchmarks/gpu.sh
#
# It uses the torch the machine already has, never installing one (a bare `pip install torch` could
# pull a build for another CUDA, or a CPU one). The Python is $PYTHON, else .venv/bin/python when its
# torch sees a GPU (a venv made with `make test TORCH=skip` over a CUDA torch), else python3.
# When that Python lacks pytest or numpy, .venv-gpu is made beside it with --system-site-packages
# (so it sees the machine's torch) and only those two are installed into it, by name.
# torchkeel itself is used from src/ (PYTHONPATH), nothing is installed for it.
# The benchmark appends its line to benchmarks/results/<date>-<host>.jsonl; GPU_OUT=<folder> also
# copies that file and the logs there.
set -euo pipefail
cd "$(dirname "$0")/.."

sees_gpu() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in .venv-gpu/bin/python .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && sees_gpu "$candidate"; then PY="$candidate"; break; fi
    done
fi
if [ -z "$PY" ] || ! sees_gpu "$PY"; then
    echo "gpu.sh: no Python here has a torch that sees a CUDA GPU (tried ${PY:-.venv-gpu, .venv, python3, python})." >&2
    echo "        Install the torch build for this machine's CUDA, or set PYTHON=/path/to/python." >&2
    exit 2
fi
if ! "$PY" -c 'import pytest, numpy' 2>/dev/null; then
    base="$("$PY" -c 'import sys; print(sys.executable)')"
    "$base" -m venv --system-site-packages .venv-gpu
    .venv-gpu/bin/python -m pip install --quiet pytest numpy
    PY=.venv-gpu/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch; print(f"gpu.sh: {torch.__version__}, CUDA {torch.version.cuda}, "
                               f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")'

LOGS="${GPU_OUT:-}"
status=0
timeout 200 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee /tmp/gpu-tests.log || status=$?
bench=0
timeout 120 "$PY" benchmarks/overhead.py --quick --device cuda 2>&1 | tee /tmp/gpu-overhead.log || bench=$?
if [ "$bench" -gt 1 ]; then status=$bench; fi   # 1: a ratio over its budget; the numbers are still printed
if [ -n "$LOGS" ]; then
    mkdir -p "$LOGS"
    cp /tmp/gpu-tests.log /tmp/gpu-overhead.log "$LOGS"/
    cp benchmarks/results/"$(date +%F)"-*.jsonl "$LOGS"/ 2>/dev/null || true
fi
exit "$status"
