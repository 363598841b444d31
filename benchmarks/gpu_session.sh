#!/usr/bin/env bash
# One GPU session on a bare machine, in priority order, each step time-boxed so a short lease still returns the
# most important results: build sloth against the machine's torch, the CUDA tests, the end-to-end QLoRA step
# (HF + PEFT + bitsandbytes vs sloth, one run), then the kernel benchmarks. Logs under $OUT (or ./gpu-logs).
#   bash benchmarks/gpu_session.sh            (needs .device-kit: bash ../shared/device/stage.sh)
#   TESTS_S / E2E_S / BENCH_S: seconds for each step (default 200 / 150 / 60); SLOTH_CUDA_ARCHS (default 90a here)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SLOTH_CUDA_ARCHS=${SLOTH_CUDA_ARCHS:-90a}
[ -f .device-kit/setup.sh ] && source .device-kit/setup.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
echo "== build ($SLOTH_CUDA_ARCHS)"; start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
echo "== cuda tests"
timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider -m "cuda and not slow" tests ${1:+-k "$1"} \
  > "$OUT/tests.log" 2>&1; echo "tests rc $?"; grep -E "passed|failed|FAILED|ERROR" "$OUT/tests.log" | tail -25
echo "== e2e: Llama-3.1-8B config QLoRA 2048 x 2"
(cd benchmarks && timeout "${E2E_S:-150}" python3 e2e.py --sides hf,sloth-offload --steps 5 --warmup 2) \
  > "$OUT/e2e.log" 2>&1; echo "e2e rc $?"; grep -vi "warn" "$OUT/e2e.log" | tail -8
for b in attention moe; do
  echo "== bench_$b"
  (cd benchmarks && timeout "${BENCH_S:-60}" python3 "bench_$b.py") > "$OUT/bench_$b.log" 2>&1
  echo "bench_$b rc $?"; tail -20 "$OUT/bench_$b.log"
done
