#!/usr/bin/env bash
# What a machine with a CUDA GPU checks, in one command of about 8 minutes on one H100: the GPU speed table
# (docs/results/speed-gpu/table.md, a row at a time; no run starts or goes on after 4 minutes), then every GPU test.
#
#     bash benchmark/gpu_check.sh              # with the project's interpreter on PATH as python
#     PYTHON=.venv/bin/python bash benchmark/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" benchmark/speed_modes.py --cuda --minutes 4
"$PYTHON" -m pytest -q -rs tests/test_gpu.py
