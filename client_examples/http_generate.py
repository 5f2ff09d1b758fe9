"""HTTP: one completion from /generate, then the same request streamed from /generate_stream.

    python client_examples/http_generate.py --url http://127.0.0.1:8000 --adapter upper

tritonclient checks that the server and model are ready; the generate
endpoints are plain JSON over HTTP (server-sent events when streaming), so
the requests themselves need only the standard library.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import tritonclient.http as httpclient

MODEL = "multilora"


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=300)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP endpoint")
    parser.add_argument("--adapter", default="upper", help="adapter name; '' for the base model")
    parser.add_argument("--prompt", default="green apple river\n=>",
                        help="the demo model's tasks take 2-5 words, then a line '=>'")
    parser.add_argument("--max-tokens", type=int, default=48,
                        help="one token is one character for the demo model: 48 fits its longest answer")
    args = parser.parse_args(argv)

    client = httpclient.InferenceServerClient(args.url.split("://", 1)[-1])
    if not client.is_model_ready(MODEL):
        return f"model {MODEL} is not ready at {args.url}"
    body = {"text_input": args.prompt, "lora_id": args.adapter, "max_tokens": args.max_tokens,
            "temperature": 0.0, "exclude_input_in_output": True, "return_finish_reason": True}
    base = f"{args.url}/v2/models/{MODEL}"
    try:
        with post(f"{base}/generate", body) as r:
            out = json.loads(r.read())
        print(f"generate        -> {out['text_output']!r} (finish_reason: {out['finish_reason']})")

        deltas = []
        with post(f"{base}/generate_stream", {**body, "stream": True}) as r:
            for line in r:  # server-sent events: "data: {...}" lines
                if line.startswith(b"data: "):
                    deltas.append(json.loads(line[len(b"data: "):])["text_output"])
        print(f"generate_stream -> {len(deltas)} events: {deltas}")
        print(f"joined          -> {''.join(deltas)!r}")
    except urllib.error.HTTPError as e:  # e.g. an unknown adapter: the server says which
        return f"HTTP {e.code}: {json.loads(e.read()).get('error')}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
