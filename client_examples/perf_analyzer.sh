#!/usr/bin/env bash
# Load test: perf_analyzer streams requests for the base model and three adapters, mixed
# (client_examples/perf_analyzer_inputs.json), over gRPC, and reports throughput and latency.
# A bounded run: a few windows of REQUESTS requests each; extra arguments go to perf_analyzer.
#   client_examples/perf_analyzer.sh                 # server of `make serve` on 127.0.0.1:8001
#   URL=host:8001 CONCURRENCY=8 client_examples/perf_analyzer.sh --percentile 95
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
PERF_ANALYZER="${PERF_ANALYZER:-$(dirname "$PYTHON")/perf_analyzer}"
# The tritonclient wheel's perf_analyzer links libcudart.so.12, even on CPU-only machines:
# the nvidia-cuda-runtime-cu12 wheel provides it.
CUDART="$("$PYTHON" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(m.__path__[0], "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${CUDART:+$CUDART:}${LD_LIBRARY_PATH:-}"
exec "$PERF_ANALYZER" -m multilora -i grpc -u "${URL:-127.0.0.1:8001}" --streaming \
  --input-data "$HERE/perf_analyzer_inputs.json" \
  --concurrency-range "${CONCURRENCY:-4}" \
  --measurement-mode count_windows --measurement-request-count "${REQUESTS:-32}" \
  --max-trials 4 --stability-percentage 999 "$@"
