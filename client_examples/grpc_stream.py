"""Stream completions for the base model and several adapters at once over one gRPC stream.

    python client_examples/grpc_stream.py --url 127.0.0.1:8001 --adapters upper,reverse,json

Every request goes out on the same bidirectional stream; the server answers
each with text deltas (one response per new chunk) and marks the last one
final. Deltas are printed as they arrive, then each request's whole text.
Needs only tritonclient[grpc].

If the server dies, the stream breaks: tritonclient calls back once, with a
gRPC status (UNAVAILABLE), and every request still open on the stream is
over. Keepalive pings notice a server that is gone without closing the
connection, and the stream's deadline bounds the whole exchange
(docs/serving.md, "When the server dies").
"""

import argparse
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

# A ping every 10 s; no answer within 10 s breaks the stream with UNAVAILABLE. ping_timeout_ms covers the
# transport's own (flow-control) pings, which otherwise wait 60 s and hold the keepalive ping back.
CHANNEL_ARGS = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.ping_timeout_ms", 10_000), ("grpc.http2.max_pings_without_data", 0)]


def make_inputs(prompt: str, adapter: str, max_tokens: int) -> list:
    def tensor(name, value, dtype, triton_type):
        t = grpcclient.InferInput(name, [1], triton_type)
        t.set_data_from_numpy(np.array([value], dtype=dtype))
        return t

    return [tensor("text_input", prompt.encode(), np.object_, "BYTES"),
            tensor("lora_id", adapter.encode(), np.object_, "BYTES"),    # "" = base model
            tensor("stream", True, bool, "BOOL"),
            tensor("max_tokens", max_tokens, np.int32, "INT32"),
            tensor("temperature", 0.0, np.float32, "FP32")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC endpoint")
    parser.add_argument("--adapters", default="upper,reverse,json", help="comma-separated adapter names")
    parser.add_argument("--no-base", action="store_true", help="skip the base-model request")
    parser.add_argument("--prompt", default="green apple river\n=>",
                        help="the demo model's tasks take 2-5 words, then a line '=>'")
    parser.add_argument("--max-tokens", type=int, default=48,
                        help="one token is one character for the demo model: 48 fits its longest answer")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of the whole stream, in seconds")
    args = parser.parse_args(argv)
    adapters = ([] if args.no_base else [""]) + [a for a in args.adapters.split(",") if a]

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url, channel_args=CHANNEL_ARGS)
    client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=args.timeout)
    for i, adapter in enumerate(adapters):
        client.async_stream_infer("multilora", make_inputs(args.prompt, adapter, args.max_tokens),
                                  request_id=str(i), enable_empty_final_response=False)

    texts, errors, open_requests = {i: "" for i in range(len(adapters))}, 0, len(adapters)
    while open_requests:
        result, error = responses.get()     # the stream's deadline bounds the wait
        if error is not None and error.status() is not None:   # the stream broke: no request gets more
            print(f"stream ended: {error.status()}: {error.message()}")
            errors, open_requests = errors + open_requests, 0
            continue
        if error is not None:  # a failed request's only response; the others carry on
            print(f"error: {error}")
            errors, open_requests = errors + 1, open_requests - 1
            continue
        response = result.get_response()
        i = int(response.id)
        delta = result.as_numpy("text_output")[0].decode("utf-8")
        texts[i] += delta
        print(f"[{adapters[i] or 'base'}] +{delta!r}")
        if response.parameters["triton_final_response"].bool_param:
            open_requests -= 1
    client.stop_stream()

    print()
    for i, adapter in enumerate(adapters):
        print(f"{adapter or 'base':>8}: {args.prompt!r} -> {texts[i]!r}")
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InferenceServerException as e:
        sys.exit(f"cannot reach the server: {e}")
