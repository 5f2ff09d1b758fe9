#!/usr/bin/env bash
# The HTTP generate endpoints with curl. Server of `make serve`: HTTP on 127.0.0.1:8000, metrics on :8002.
#   client_examples/curl_examples.sh            # or: HTTP=http://host:8000 METRICS=http://host:8002 ...
set -euo pipefail
HTTP="${HTTP:-http://127.0.0.1:8000}"
METRICS="${METRICS:-http://127.0.0.1:8002}"
MODEL="$HTTP/v2/models/multilora"

echo "# ready?"
curl -sf -o /dev/null -w "%{http_code}\n" "$MODEL/ready"

echo "# one response: the base model (the prompt is repeated first, as in vllm_backend)"
curl -s "$MODEL/generate" -d '{"text_input": "green apple river\n=>", "max_tokens": 48, "temperature": 0}'
echo

echo "# one response: adapter upper, new text only, with finish reason and token counts"
curl -s "$MODEL/generate" -d '{"text_input": "green apple river\n=>", "lora_id": "upper",
  "max_tokens": 48, "temperature": 0, "exclude_input_in_output": true,
  "return_finish_reason": true, "return_num_input_tokens": true, "return_num_output_tokens": true}'
echo

echo "# streamed (server-sent events), the adapter chosen vllm_backend-style in sampling_parameters"
curl -sN "$MODEL/generate_stream" -d '{"text_input": "quiet honey tiger\n=>", "stream": true,
  "sampling_parameters": "{\"lora_name\": \"reverse\", \"max_tokens\": \"48\", \"temperature\": \"0\"}"}'

echo "# an unknown adapter: the error names it (HTTP 400)"
curl -s -w " [%{http_code}]\n" "$MODEL/generate" -d '{"text_input": "green apple river\n=>", "lora_id": "nope"}'

echo "# per-adapter counters on /metrics"
curl -s "$METRICS/metrics" | grep '^multilora:requests_total' || true
