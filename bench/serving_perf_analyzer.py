"""perf_analyzer --streaming over the same requests and concurrency: the check that the
benchmark's own gRPC client is not what limits the Triton server target."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

from serving_triton import MODEL
from serving_workload import BenchRequest, adapter_name

def perf_analyzer_inputs(requests: list[BenchRequest], path: Path) -> Path:
    rows = []
    for r in requests:
        row = {"input_ids": {"content": r.prompt_ids, "shape": [len(r.prompt_ids)]}, "stream": [True],
               "ignore_eos": [True], "max_tokens": [r.output_len], "temperature": [0.0]}
        if r.adapter_index is not None:
            row["lora_id"] = [adapter_name(r.adapter_index)]
        rows.append(row)
    path.write_text(json.dumps({"data": rows}))
    return path


def run_perf_analyzer(url: str, requests: list[BenchRequest], concurrency: int, work: Path,
                      binary: Optional[str] = None, timeout: float = 300) -> dict:
    """perf_analyzer --streaming at the same concurrency over the same requests; its req/s."""
    binary = binary or os.environ.get("PERF_ANALYZER") or str(Path(sys.executable).parent / "perf_analyzer")
    inputs = perf_analyzer_inputs(requests, work / "perf_analyzer_inputs.json")
    cmd = [binary, "-m", MODEL, "-i", "grpc", "-u", url, "--streaming", "--input-data", str(inputs),
           "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
           "--measurement-request-count", str(max(concurrency, len(requests) // 2)),
           "--max-trials", "3", "--stability-percentage", "999"]
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cudart     # the wheel's perf_analyzer links libcudart.so.12
        env["LD_LIBRARY_PATH"] = os.pathsep.join([os.path.join(cudart.__path__[0], "lib"),
                                                  env.get("LD_LIBRARY_PATH", "")])
    except ImportError:
        pass
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"ok": False, "error": str(error)}
    out = run.stdout + run.stderr
    (work / "perf_analyzer.log").write_text(" ".join(cmd) + "\n" + out)
    found = re.search(r"Client:.*?Throughput: ([\d.]+) infer/sec", out, re.S)
    responses = re.search(r"Response Throughput: ([\d.]+)", out)
    return {"ok": run.returncode == 0 and found is not None, "returncode": run.returncode,
            "req_s": float(found[1]) if found else None, "responses_s": float(responses[1]) if responses else None,
            "log": str(work / "perf_analyzer.log"), "tail": out.strip().splitlines()[-3:] if out.strip() else []}
