#!/usr/bin/env bash
# The GPU checks in one script, for a GPU machine whose image has python3 with CuPy, torch, numpy,
# attrs, onnx and pytest but not inferkit's other needs (see docs/gpu.md, "On a lent GPU machine").
# Run from the project root: bash benchmarks/gpu_check.sh [kernels|all] [OUT_DIR]
#   kernels: the CuPy kernels against their twins, then make bench-gpu's kernel rows (no onnxruntime-gpu needed)
#   all:     every GPU-marked test file and the whole benchmark (needs onnxruntime-gpu: .ort0 ... .ort3)
# Wheels in .whl/ (structlog at least) are installed into /tmp/site first.
set -o pipefail
phase=${1:-all}
rc=0
out=${2:-${OUT:-.}}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit
fi
if [ -f .ort3/part.3 ] && [ -f .ort0/ort-gpu-env.sh ]; then source .ort0/ort-gpu-env.sh; fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
pt() { timeout -k 5 "$1" python3 -m pytest -p no:cacheprovider -q -rs --tb=short -o timeout=60 "${@:2}"; }
nvidia-smi -L
case $phase in
  kernels)
    pt 200 tests/test_gpu_kernels.py 2>&1 | tee "$out/kernels.log" || rc=1
    timeout -k 5 200 python3 benchmarks/bench_gpu.py 2>&1 | tee "$out/bench.log" || rc=1 ;;
  all)
    pt 300 tests/test_gpu_kernels.py tests/test_gpu_predictor.py tests/test_backends.py tests/test_pipeline.py \
      tests/test_device_arrays.py tests/test_backends_torch.py 2>&1 | tee "$out/tests.log" || rc=1
    timeout -k 5 200 python3 benchmarks/bench_gpu.py 2>&1 | grep -v "plugin EP device" | tee "$out/bench.log" || rc=1 ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [kernels|all] [OUT_DIR]"; exit 2 ;;
esac
exit $rc
