"""Bad requests get their own error while a concurrent stream completes correctly, and the server stays ready."""

import json
import threading

import numpy as np
import pytest
from triton_client import http_generate, run_stream

GOOD = {"text_input": "the quick brown fox", "lora_id": "upper", "stream": True, "max_tokens": 24,
        "temperature": 0.0, "ignore_eos": True}

# id -> (request inputs, a fragment the error message must contain)
BAD_REQUESTS = {
    "unknown adapter": ({"text_input": "Hi", "lora_id": "nope"}, "unknown adapter 'nope'"),
    "unknown lora_name": ({"text_input": "Hi", "sampling_parameters": json.dumps({"lora_name": "nope"})},
                          "unknown adapter 'nope'"),
    "parent traversal": ({"text_input": "Hi", "lora_id": "../x"}, "not a valid adapter name"),
    "absolute path": ({"text_input": "Hi", "lora_id": "/etc/passwd"}, "not a valid adapter name"),
    "symlink out of the root": ({"text_input": "Hi", "lora_id": "escape"}, "leaves the adapter root"),
    "pickled .bin adapter": ({"text_input": "Hi", "lora_id": "binonly"}, "safetensors"),
    "wrong dtype": ({"text_input": "Hi", "max_tokens": np.array([4.0], dtype=np.float32)}, "max_tokens"),
    "wrong shape": ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, "text_input"),
    "empty prompt": ({"text_input": ""}, "empty"),
    "max_tokens 0": ({"text_input": "Hi", "max_tokens": 0}, "max_tokens"),
    "max_tokens < 0": ({"text_input": "Hi", "max_tokens": -3}, "max_tokens"),
    "no prompt": ({"max_tokens": 4}, "text_input"),
    "bad sampling JSON": ({"text_input": "Hi", "sampling_parameters": "{max_tokens"}, "not valid JSON"),
    "streaming with the prompt": ({"text_input": "Hi", "stream": True, "exclude_input_in_output": False},
                                  "exclude_input_in_output"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_fails_alone(server, reference, case):
    values, fragment = BAD_REQUESTS[case]
    good = {}
    worker = threading.Thread(target=lambda: good.update(run_stream(server.grpc_url, {"good": GOOD})))
    worker.start()
    bad = run_stream(server.grpc_url, {"bad": values})["bad"]
    worker.join(timeout=120)

    assert bad.error is not None and fragment in bad.error, bad.error
    assert bad.finals == 1 and bad.deltas == []
    for path in (server.adapter_root, server.adapter_root.parent, server.model_dir):
        assert str(path) not in bad.error, "error messages must not show server paths"
    assert good["good"].error is None
    assert good["good"].text == reference(GOOD["text_input"], "upper", GOOD["max_tokens"])[0]
    assert server.is_ready()


def test_http_errors_name_the_problem(server):
    status, out = http_generate(server.http_url, {"text_input": "Hi", "lora_id": "nope"})
    assert status >= 400 and "unknown adapter 'nope'" in out["error"]
    status, out = http_generate(server.http_url, {"text_input": "Hi", "max_tokens": 0})
    assert status == 400 and "max_tokens" in out["error"]
    assert server.is_ready()
