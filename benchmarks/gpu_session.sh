#!/usr/bin/env bash
# One GPU session on a bare machine: build sloth against the machine's torch, run the CUDA tests, then
# the benchmarks, logging under $OUT (or ./gpu-logs). Usage: bash benchmarks/gpu_session.sh [pytest -k expr]
#   Needs .device-kit (bash ../shared/device/stage.sh) and, where the image lacks scikit-build-core /
#   cmake / ninja, their wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
[ -f .device-kit/setup.sh ] && source .device-kit/setup.sh
if ! python3 -c "import scikit_build_core" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
echo "== build"; start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
(cd /tmp && python3 -m sloth info) | tee "$OUT/info.log"
K=${1:-}
echo "== tests"
python3 -m pytest -q -p no:cacheprovider tests ${K:+-k "$K"} 2>&1 | tee "$OUT/tests.log" | tail -25
echo "== benchmarks"
python3 -m pytest -q -p no:cacheprovider benchmarks/bench_*.py --benchmark-disable ${K:+-k "$K"} 2>&1 | tee "$OUT/bench.log" | tail -40
