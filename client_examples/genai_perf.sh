#!/usr/bin/env bash
# genai-perf: LLM metrics (time to first token, inter-token latency, tokens/s) for one adapter.
# genai-perf is not a project requirement (it is large): `pip install genai-perf` in its own
# environment. It sends vllm_backend-style inputs (--backend vllm); --extra-inputs adds lora_id.
# It runs the perf_analyzer found on PATH: the one in .venv (tritonclient's) is put first.
#   GENAI_PERF=/path/to/genai-perf ADAPTER=reverse client_examples/genai_perf.sh   # `make serve` on :8001
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
export PATH="$(dirname "$PYTHON"):$PATH"
CUDART="$("$PYTHON" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(m.__path__[0], "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${CUDART:+$CUDART:}${LD_LIBRARY_PATH:-}"
TOKENIZER="${TOKENIZER:-$HERE/../models/demo-llama}"
[ -d "$TOKENIZER" ] || TOKENIZER="$HERE/../.run/random-model/model"   # make serve's stand-in model
exec "${GENAI_PERF:-genai-perf}" profile -m multilora --backend vllm --streaming \
  -u "${URL:-127.0.0.1:8001}" --tokenizer "$TOKENIZER" \
  --synthetic-input-tokens-mean 32 --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean 16 --output-tokens-mean-deterministic \
  --extra-inputs "lora_id:${ADAPTER:-upper}" --extra-inputs temperature:0.0 \
  --concurrency "${CONCURRENCY:-4}" --request-count "${REQUESTS:-48}" \
  --artifact-dir "${ARTIFACTS:-/tmp/genai-perf-multilora}" "$@"
