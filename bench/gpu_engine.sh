#!/usr/bin/env bash
# Issue 7 on a GPU host that has only the image (python3 with torch, triton, transformers, peft):
# the GPU correctness tests (bf16 against HF + PEFT, CUDA graphs and eager, async scheduling on
# and off; the kernels against their torch twins), then bench/decode_step.py --profile. Logs and
# JSON under $OUT; the bench's table is printed last.
#
#   bash bench/gpu_engine.sh                 # on the device (a few minutes)
#   BENCH_ARGS="--engine-arg async_scheduling=false" bash bench/gpu_engine.sh
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/gpu_engine}"
mkdir -p "$OUT" /tmp/multilora-pp
# The kernels import as multilora_kernels: a folder of that name on PYTHONPATH points at kernels/.
ln -sfn "$REPO/kernels" /tmp/multilora-pp/multilora_kernels
export PYTHONPATH="$REPO/backend_src:/tmp/multilora-pp" PYTHONUNBUFFERED=1 MULTILORA_TEST_THREADS=4
log() { echo "[gpu_engine $(date -u +%H:%M:%S)] $*"; }

log "GPU tests (tests/gpu, CUDA cases of tests/kernels and of the sampler tests)"
# -P: not the repo root on sys.path (transformers would take kernels/ for its `kernels` package).
timeout "${TIMEOUT_TESTS:-180}" python3 -P -m pytest -q -p no:cacheprovider \
  tests/gpu tests/kernels tests/test_sampler.py tests/test_sampler_vs_previous.py -k "gpu or cuda" > "$OUT/tests.log" 2>&1
log "tests: exit code $? ($(tail -n 1 "$OUT/tests.log"))"
log "bench/decode_step.py --profile ${BENCH_ARGS:-}"
# shellcheck disable=SC2086
timeout "${TIMEOUT_BENCH:-300}" python3 bench/decode_step.py --profile --out "$OUT" ${BENCH_ARGS:-} \
  > "$OUT/decode_step.log" 2>&1
log "bench: exit code $?"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
sed -n '/^NVIDIA\|^cpu,/,$p' "$OUT/decode_step.log"
