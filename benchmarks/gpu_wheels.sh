#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh needs on a GPU machine that has PyTorch
# but no network and Python 3.12 (the lent H100/H200 machines): run where PyPI is reachable, from the
# repository root, then carry .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
    zarr==3.1.6 numcodecs==0.15.2 donfig google-crc32c imagecodecs dask toolz partd locket cloudpickle hydra-core==1.3.8 omegaconf==2.3.1 \
    iopath==0.1.9 portalocker pooch platformdirs typing-extensions crc32c
# sam2 1.1.0 and the antlr4 runtime omegaconf 2.3 needs are source releases: built here into pure-Python
# wheels (sam2 without its CUDA extension)
SAM2_BUILD_CUDA=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl sam2==1.1.0 antlr4-python3-runtime==4.9.3
du -sh .whl
