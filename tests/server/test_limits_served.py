"""Limits through a real Triton server: oversized requests refused alone while a stream runs, and how HTTP JSON
numbers reach the model (tritonserver casts them to the input's declared type first: docs/limits.md).
"""

import json
import threading

from triton_client import http_generate, run_stream

GOOD = {"text_input": "the quick brown fox", "lora_id": "upper", "stream": True, "max_tokens": 24,
        "temperature": 0.0, "ignore_eos": True}


def test_oversized_requests_fail_alone_and_fast(server, reference):
    bad_requests = {
        # The default: 32 bytes per token of the tiny model's 128-token context.
        "2 MB prompt": ({"text_input": "x" * (2 << 20)}, "text_input is 2097152 bytes; this server takes at "
                                                         "most 4096 (max_prompt_bytes)"),
        "100 stop strings": ({"text_input": "Hi", "stop": [f"s{i}" for i in range(100)]},
                             "100 stop strings; this server takes at most 16 (max_stop_strings)"),
        "deep sampling_parameters": ({"text_input": "Hi", "sampling_parameters": "[" * 5000 + "]" * 5000},
                                     "nests 5000 levels deep"),
        "5000-digit number": ({"text_input": "Hi", "sampling_parameters": '{"seed": ' + "9" * 5000 + "}"},
                              "a 5000-digit number"),
    }
    good = {}
    worker = threading.Thread(target=lambda: good.update(run_stream(server.grpc_url, {"good": GOOD})))
    worker.start()
    for name, (values, fragment) in bad_requests.items():     # one stream each: an error names no request
        bad = run_stream(server.grpc_url, {name: values})[name]
        assert bad.error is not None and fragment in bad.error, (name, bad.error)
        assert bad.finals == 1 and bad.deltas == []
    worker.join(timeout=120)
    assert good["good"].error is None
    assert good["good"].text == reference(GOOD["text_input"], "upper", GOOD["max_tokens"])[0]
    assert server.is_ready()


def test_http_json_integers_are_cast_by_tritonserver_before_the_model(server, reference):
    # tritonserver (src/http_server.cc, ReadDataFromJsonHelper) casts a JSON number to the declared INT32 with
    # no range check, so the model receives 2**40 as 0: refused, but the message can only show 0.
    status, out = http_generate(server.http_url, {"text_input": "Hi", "max_tokens": 2**40})
    assert status == 400 and "max_tokens must be an integer in [1, 2**31), got 0" in out["error"]
    # Inside sampling_parameters the number reaches the model as sent, and is refused as sent.
    body = {"text_input": "Hi", "sampling_parameters": json.dumps({"max_tokens": 2**40})}
    status, out = http_generate(server.http_url, body)
    assert status == 400 and "max_tokens must be an integer in [1, 2**31), got 1099511627776" in out["error"]
    # An input id 2**40 + 7 arrives as 7, and is served as 7 (documented; the model cannot tell).
    body = {"input_ids": [5, 2**40 + 7], "max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    status, out = http_generate(server.http_url, body)
    assert status == 200 and out["output_ids"] == reference([5, 7], None, 3)[1]
