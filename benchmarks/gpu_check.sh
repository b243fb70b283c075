#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA parity fp32 / bf16 and frames per second, ours beside the
# reference, then fine-tuning clips per second and memory (benchmarks/bench_train.py), in one run of about
# 5 minutes on one H100/H200 (at most 420 s + 120 s). Run from the repository root on the GPU machine:
#     bash benchmarks/gpu_check.sh [gpu_check.py options]     (output also in $OUT/gpu_check.log when $OUT is set)
# What the GPU machine lacks is installed from .whl/ when that folder exists (a machine with no network:
# fill it beforehand with `bash benchmarks/gpu_wheels.sh` where PyPI is reachable), else from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    $PY -m pip install -q hydra-core iopath zarr imagecodecs dask tifffile scipy pandas tqdm pooch
    SAM2_BUILD_CUDA=0 $PY -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
fi
export PYTHONPATH=src:tests${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
log=${OUT:-/tmp}/gpu_check.log
status=0
timeout 420 $PY benchmarks/gpu_check.py "$@" 2>&1 | grep -v "propagate in video" | tee "$log" || status=$?
# fine-tuning at the official 1024: frozen encoder / LoRA (skipped without peft) / full, 3 steps each
echo | tee -a "$log"
timeout 120 $PY benchmarks/bench_train.py --device cuda --image-size 1024 --steps 3 2>&1 | tee -a "$log" || status=$?
exit $status
