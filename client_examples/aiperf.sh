#!/usr/bin/env bash
# aiperf (genai-perf's successor): LLM metrics over HTTP generate_stream with a different
# adapter per request. Each line of aiperf_inputs.jsonl is one request: a demo prompt, its
# output length, and vllm_backend-style `sampling_parameters` naming the adapter (`lora_name`;
# none = the base model) with temperature 0, merged into the payload of aiperf_payload.json.j2.
# aiperf is not a project requirement (it is large): `pip install aiperf` in its own environment.
#   AIPERF=/path/to/aiperf client_examples/aiperf.sh        # `make serve` on 127.0.0.1:8000
#   HTTP=http://host:8000 CONCURRENCY=8 REQUESTS=64 client_examples/aiperf.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"     # aiperf reads the template from a relative path without symlinks
exec "${AIPERF:-aiperf}" profile --model-names multilora --endpoint-type template \
  --url "${HTTP:-http://127.0.0.1:8000}" --custom-endpoint /v2/models/multilora/generate_stream --streaming \
  --extra-inputs payload_template:aiperf_payload.json.j2 --extra-inputs response_field:text_output \
  --input-file aiperf_inputs.jsonl --custom-dataset-type single_turn \
  --tokenizer "${TOKENIZER:-$HERE/../models/demo-llama}" \
  --concurrency "${CONCURRENCY:-4}" --request-count "${REQUESTS:-32}" \
  --artifact-dir "${ARTIFACTS:-/tmp/aiperf-multilora}" --ui-type simple "$@"
