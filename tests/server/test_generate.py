"""Through a real Triton server: streams and HTTP generate reproduce the engine's in-process output exactly."""

import json

from triton_client import Streams, http_generate, run_stream

MAX_TOKENS = 12
# A client that pings every second, and gives up on a server that does not answer a ping within 5 s.
PINGING_CLIENT = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 5000),
                  ("grpc.http2.ping_timeout_ms", 5000), ("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.max_pings_without_data", 0)]
IDLE_S = 5.0    # Triton server's own policy would have closed the connection after about 3 such pings


def stream_request(prompt, adapter=None, **extra) -> dict:
    values = {"text_input": prompt, "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0.0,
              "ignore_eos": True, **extra}
    if adapter is not None:
        values["lora_id"] = adapter
    return values


def test_concurrent_streams_for_base_and_adapters_match_the_engine(server, reference):
    cases = {  # request id -> (prompt, adapter)
        "base": ("Hello, world!", None),
        "upper": ("SELECT name FROM users WHERE", "upper"),
        "reverse": ("Hello, world!", "reverse"),
        "json": ("the quick brown fox", "json"),
        "registered": ("Hello, world!", server.registered),   # through multi_lora.json, outside the root
    }
    requests = {rid: stream_request(prompt, adapter, return_finish_reason=True)
                for rid, (prompt, adapter) in cases.items()}
    results = run_stream(server.grpc_url, requests)

    for rid, (prompt, adapter) in cases.items():
        r = results[rid]
        text, token_ids = reference(prompt, adapter, MAX_TOKENS)
        assert r.error is None, (rid, r.error)
        assert r.finals == 1, rid
        assert (r.text, r.token_ids) == (text, token_ids), rid
        assert len(r.deltas) > 1, f"{rid}: one response per new chunk, not one in all"
        assert r.finish_reason == "length", rid
    # The adapters really change the output, so the comparison above says something.
    assert results["base"].text != results["reverse"].text != results["registered"].text


def test_sampling_parameters_lora_name_selects_the_adapter(server, reference):
    params = json.dumps({"lora_name": "reverse", "max_tokens": str(MAX_TOKENS), "temperature": "0",
                         "ignore_eos": "true"})  # vllm_backend style: values may be strings
    r = run_stream(server.grpc_url, {"x": {"text_input": "Hello, world!", "stream": True,
                                           "sampling_parameters": params}})["x"]
    assert r.error is None
    assert r.text == reference("Hello, world!", "reverse", MAX_TOKENS)[0]


def test_http_generate_returns_the_same_text(server, reference):
    prompt = "SELECT name FROM users WHERE"
    text, token_ids = reference(prompt, "upper", MAX_TOKENS)
    body = {"text_input": prompt, "lora_id": "upper", "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}

    status, out = http_generate(server.http_url, {**body, "exclude_input_in_output": True,
                                                  "return_num_input_tokens": True, "return_num_output_tokens": True})
    assert status == 200, out
    assert out["text_output"] == text
    assert out["output_ids"] == token_ids
    assert out["num_output_tokens"] == MAX_TOKENS and out["num_input_tokens"] > 0

    status, out = http_generate(server.http_url, body)  # vllm_backend default: the prompt comes first
    assert (status, out["text_output"]) == (200, prompt + text)

    status, events = http_generate(server.http_url, {**body, "stream": True}, stream=True)
    assert status == 200
    assert "".join(e["text_output"] for e in events) == text
    assert len(events) > 1


def test_token_id_prompt(server, reference):
    prompt = [5, 17, 42, 99, 123, 7]
    text, token_ids = reference(prompt, "json", MAX_TOKENS)
    r = run_stream(server.grpc_url, {"ids": {"input_ids": prompt, "lora_id": "json", "stream": True,
                                             "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}})["ids"]
    assert r.error is None
    assert (r.text, r.token_ids) == (text, token_ids)


def test_a_client_pinging_every_second_keeps_its_idle_stream(server, reference):
    """Keepalive pings are how a client notices a dead server (docs/serving.md); serve.py lets them through."""
    streams = Streams(server.grpc_url, {"first": stream_request("Hello, world!")}, channel_args=PINGING_CLIENT)
    try:
        streams.collect(lambda: streams.answered() == 1, timeout=60)
        streams.collect(lambda: streams.broken is not None, timeout=IDLE_S)     # nothing but pings
        streams.send({"second": stream_request("the quick brown fox", "upper")})
        streams.collect(lambda: streams.answered() == 2, timeout=60)
    finally:
        streams.close()
    assert streams.broken is None and streams.finished == {"first", "second"}, streams.broken
    assert streams.tokens["first"] == reference("Hello, world!", None, MAX_TOKENS)[1]
    assert streams.tokens["second"] == reference("the quick brown fox", "upper", MAX_TOKENS)[1]
