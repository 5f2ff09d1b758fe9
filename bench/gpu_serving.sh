#!/usr/bin/env bash
# Issue 8's serving runs on a GPU host that has only the image (python3 with torch,
# transformers, peft, grpcio, matplotlib; no tritonserver, no tritonclient, no network):
#   1. installs the carried Triton server 2.51 (nvidia-pytriton 0.7.0 unpacked, the 3.12 stub
#      only) with numpy 1.26.4 (the stub needs numpy < 2) into a virtual environment on top of
#      the image's packages, this checkout importable there through a .pth file (the Python
#      backend stub does not pass PYTHONPATH on); the benchmark runs in the image's python3 with
#      tritonclient 2.51 (gRPC), python-rapidjson and protobuf 4.25 on PYTHONPATH, and
#      tritonclient's perf_analyzer (+ Debian's libb64) behind a wrapper;
#   2. runs, each part under `timeout`, logs and JSON under $OUT:
#      A  in-process vs the Triton server, 64 streams, streaming, base + 16 adapters (ranks
#         8/16/64), zero errors expected; perf_analyzer --streaming at the same concurrency;
#      B  128 rank-16 adapters, Zipf popularity, 64 streams, fixed lengths: the engine (and its
#         bound: 64 rows decoding together over the distinct adapters it batched), HF transformers
#         generate and HF + PEFT mixed adapter_names at the same batch and lengths;
#      W  part B's engine run again with every adapter read into host memory during warm-up (600
#         warm-up requests, max_cpu_loras 128): beside B, what the adapter loads cost the steps;
#      C  1024 adapters (ranks 8/16/64), max_loras 32, max_cpu_loras 128, Poisson arrivals at
#         80% of the closed-loop req/s (RATE_C=R: at R req/s instead, no closed loop: the same
#         arrivals for two variants set side by side): every request finishes, TTFT p99, longest
#         wait, ITL while adapters load vs warm, GPU memory from warm-up to end;
#      BL, CL  parts B and C (the engine only) with adapters read in $LOAD_WORKERS load worker processes
#         (adapter_load_workers; default 2), to set beside B and C;
#   3. prints the table and the issue's checks (bench/serving_summary.py) last.
#
#   bash bench/gpu_serving.sh                        # on the device: carry .carry/ (see below)
#   PARTS="A" bash bench/gpu_serving.sh              # some parts only
#   PYTHON=.venv/bin/python PRESET=tiny bash bench/gpu_serving.sh   # an installed env, tiny model
#
# CARRY (default .carry/, built by bench/make_gpu_carry.sh) holds: triton-2.51-cp312.tar.xz (srv/ -> site-packages: pytriton/
# with tritonserver/ and an empty __init__.py, nvidia_pytriton.libs/ without libpython 3.13;
# client/ -> site-packages: tritonclient; bin/perf_analyzer), wheels/*.whl (numpy 1.26.4,
# python-rapidjson, protobuf 4.25.9; cp312 manylinux) and libb64-0d_*.deb.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/gpu_serving}"   # kept small: A/B/C.json, summary.txt, the plot, logs.tar.gz
CARRY="${CARRY:-$REPO/.carry}"
ENV_DIR="${ENV_DIR:-/tmp/multilora-env}"
WORK="${WORK:-/tmp/multilora-serving}"
PRESET="${PRESET:-llama3-8b}"
PARTS="${PARTS:-A B C}"
BASE_PYTHON="${BASE_PYTHON:-python3}"   # the image's interpreter (torch, transformers, peft)
# Sizes: the defaults fit the three parts in ~10 minutes on an H200 (engine start-ups included;
# worst case, every part at its limit: 600 s + install). For more room, run PARTS="A C" and
# PARTS=B in two calls with larger TIMEOUT_*/TARGETS_*.
CONCURRENCY="${CONCURRENCY:-64}" PROMPT_LEN="${PROMPT_LEN:-128:512}" PROMPT_LEN_B="${PROMPT_LEN_B:-256}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
REQUESTS_A="${REQUESTS_A:-256}" REQUESTS_B="${REQUESTS_B:-192}" REQUESTS_C="${REQUESTS_C:-320}"
# Each part's limit, and in A and B each target's (a target past its limit is stopped, its run missing).
# C: engine start, warm-up and closed-loop calibration take ~60 s before its Poisson run (~90 s for 200 requests).
TIMEOUT_A="${TIMEOUT_A:-210}" TIMEOUT_B="${TIMEOUT_B:-190}" TIMEOUT_C="${TIMEOUT_C:-200}" TIMEOUT_W="${TIMEOUT_W:-100}"
TARGETS_A="${TARGETS_A:-95,110}" TARGETS_B="${TARGETS_B:-60,35,95}"
LOAD_WORKERS="${LOAD_WORKERS:-2}"   # parts BL and CL
RATE_C="${RATE_C:-}"              # part C: a fixed Poisson rate (req/s) instead of 80% of its closed loop
B_TARGETS="${B_TARGETS:-inproc,hf,hf-peft}"   # part B's targets (TARGETS_B: their limits, in this order)
RAW="$WORK/out"                  # every run's JSON and log, the server logs (tarred into $OUT at the end)
rm -rf "$RAW" && mkdir -p "$OUT" "$WORK" "$RAW"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # no network there: fail fast, never wait
log() { echo "[gpu_serving $(date -u +%H:%M:%S)] $*"; }

X=/tmp/multilora-carry      # unpacked carry: client packages, perf_analyzer, libb64

install_carry() {
  # The server's environment: a venv whose own numpy 1.26.4 comes before the image's packages.
  # The benchmark itself runs in the image's python3 (numpy 2), the gRPC client on PYTHONPATH.
  local base="$BASE_PYTHON"
  [ -d "$CARRY" ] || { echo "no carry folder $CARRY; see this script's header" >&2; return 1; }
  rm -rf "$ENV_DIR" "$X" && mkdir -p "$X/pp" "$X/client-site" || return 1
  "$base" -m venv --without-pip "$ENV_DIR" || return 1
  local site
  site="$("$ENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
  [ -n "$site" ] || return 1
  "$base" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
    > "$site/zz_image_packages.pth" || return 1
  # The image's scipy and scikit-learn are built for numpy 2 and fail to import over 1.26.4;
  # transformers imports them only when present: a None in sys.modules makes find_spec say absent.
  echo "import sys; [sys.modules.setdefault(m, None) for m in ('scipy', 'sklearn')]" \
    > "$site/zz_hide_numpy2_builds.pth" || return 1
  "$base" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$CARRY"/wheels/numpy-*.whl || return 1
  "$base" -m pip install -q --no-index --no-deps --no-compile --target "$X/client-site" \
    "$CARRY"/wheels/python_rapidjson-*.whl "$CARRY"/wheels/protobuf-*.whl || return 1
  if command -v xz >/dev/null; then
    tar -xJf "$CARRY"/triton-2.51-cp312.tar.xz -C "$X" || return 1
  else
    "$base" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$CARRY"/triton-2.51-cp312.tar.xz "$X" || return 1
  fi
  cp -a "$X/srv/." "$site/" && cp -a "$X/client/." "$X/client-site/" || return 1
  # perf_analyzer links libb64.so.0d (Debian's package) and libcudart.so.12 (the wheel's copy).
  dpkg -x "$CARRY"/libb64-0d_*.deb "$X/b64" || return 1
  mkdir -p "$X/cudart12" || return 1
  ln -sf "$(ls "$site"/nvidia_pytriton.libs/libcudart-*.so.12*)" "$X/cudart12/libcudart.so.12" || return 1
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s:%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
    "$X/b64/usr/lib/x86_64-linux-gnu" "$X/cudart12" "$X/bin/perf_analyzer" > "$ENV_DIR/bin/perf_analyzer"
  chmod +x "$ENV_DIR/bin/perf_analyzer" "$X/bin/perf_analyzer" || return 1
  # This checkout, importable by every interpreter of the server's environment (the stub's too).
  ln -sfn "$REPO/kernels" "$X/pp/multilora_kernels" || return 1
  printf '%s\n%s\n' "$REPO/backend_src" "$X/pp" > "$site/multilora_checkout.pth"
}

check_env() {   # check_env PYTHON server|bench: what that role imports
  "$1" -c '
import importlib, os, sys
need = {"server": ["numpy", "multilora", "multilora_kernels", "pytriton"],
        "bench": ["numpy", "torch", "transformers", "peft", "multilora", "multilora_kernels", "tritonclient.grpc"]}
mods = {m: importlib.import_module(m) for m in need[sys.argv[1]]}
np, where = mods["numpy"], os.path.dirname(mods["multilora"].__file__)
if sys.argv[1] == "server":
    assert np.__version__.startswith("1."), f"numpy {np.__version__}: the Triton stub needs numpy < 2"
    server = os.path.join(os.path.dirname(mods["pytriton"].__file__), "tritonserver", "bin", "tritonserver")
    assert os.path.isfile(server), f"no {server}"
print(f"{sys.argv[1]}: {sys.executable}, numpy {np.__version__}, multilora from {where}")
' "$2"
}

stop_leftover_servers() {   # servers started by a part that was killed outright (pid files of serving.py)
  local f
  for f in "$RAW"/*.pid; do
    [ -f "$f" ] || continue
    kill -TERM -- "-$(cat "$f")" 2>/dev/null && sleep 5 && kill -KILL -- "-$(cat "$f")" 2>/dev/null
    rm -f "$f"
  done
}

part() {   # part NAME TIMEOUT ARGS...: one bench/serving.py invocation, its log under $OUT
  local name="$1" limit="$2"; shift 2
  log "part $name (timeout ${limit}s): bench/serving.py $*"
  timeout --kill-after=30 "$limit" "$PY" bench/serving.py --preset "$PRESET" --work "$WORK" --out "$RAW" \
    --label "$name" --progress-every 15 --server-python "$SERVER_PY" "$@" 2>&1 | tee "$RAW/$name.log"
  local code="${PIPESTATUS[0]}"
  [ "$code" = 0 ] || FAILED=1
  stop_leftover_servers
  log "part $name: exit code $code$([ "$code" = 124 ] && echo ' (timed out)')"
}

START=$(date +%s) FAILED=0
if [ -n "${PYTHON:-}" ]; then      # one environment that has everything (e.g. make venv's)
  PY="$PYTHON" SERVER_PY="$PYTHON"
else
  log "installing the carried packages ($ENV_DIR for the server, $X for the client)"
  install_carry > "$RAW/install.log" 2>&1 || { log "install failed:"; tail -20 "$RAW/install.log"; exit 1; }
  PY="$BASE_PYTHON" SERVER_PY="$ENV_DIR/bin/python"
  export PYTHONPATH="$REPO/backend_src:$X/pp:$X/client-site${PYTHONPATH:+:$PYTHONPATH}"
  export PERF_ANALYZER="$ENV_DIR/bin/perf_analyzer"
fi
check_env "$SERVER_PY" server && check_env "$PY" bench || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

for p in $PARTS; do
  case "$p" in
    A) part A "$TIMEOUT_A" --target inproc,triton --adapters 16 --ranks 8,16,64 --base-share 0.25 \
         --concurrency "$CONCURRENCY" --requests "$REQUESTS_A" --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --max-loras 16 \
         --perf-analyzer --client-procs 4 --target-timeout "$TARGETS_A" ;;
    B|BL) part "$p" "$TIMEOUT_B" --target "$([ "$p" = BL ] && echo inproc || echo "$B_TARGETS")" \
         $([ "$p" = BL ] && echo --engine-arg adapter_load_workers="$LOAD_WORKERS") --adapters 128 --ranks 16 --alpha 1.0 \
         --concurrency "$CONCURRENCY" --requests "$REQUESTS_B" --prompt-len "$PROMPT_LEN_B" --output-len "$OUTPUT_LEN" \
         --max-loras 64 --hf-batch "$CONCURRENCY" --decode-bound --target-timeout "$TARGETS_B" ;;
    W) part W "$TIMEOUT_W" --target inproc --adapters 128 --ranks 16 --alpha 1.0 \
         --concurrency "$CONCURRENCY" --requests "$REQUESTS_B" --prompt-len "$PROMPT_LEN_B" --output-len "$OUTPUT_LEN" \
         --max-loras 64 --max-cpu-loras 128 --warmup 600 --decode-bound ;;
    C|CL) part "$p" "$TIMEOUT_C" --target inproc $([ "$p" = CL ] && echo --engine-arg adapter_load_workers="$LOAD_WORKERS") \
         --adapters 1024 --ranks 8,16,64 --max-loras 32 --max-cpu-loras 128 \
         --concurrency "$CONCURRENCY" $([ -n "$RATE_C" ] && echo --rate "$RATE_C" || echo --rate-fraction 0.8) \
         --requests "$REQUESTS_C" --prompt-len "$PROMPT_LEN" \
         --output-len "$OUTPUT_LEN" \
         --save-records ;;
    *) log "unknown part $p (A, B, BL, W, C or CL)" ;;
  esac
done

log "all parts done in $(( $(date +%s) - START ))s"
files=()
for p in $PARTS; do
  [ -f "$RAW/$p.json" ] && cp "$RAW/$p.json" "$OUT/" && files+=("$RAW/$p.json")
done
tar -czf "$OUT/logs.tar.gz" -C "$RAW" . 2>/dev/null
"$PY" bench/serving_summary.py "${files[@]}" | tee "$OUT/summary.txt"
[ -f "$RAW/serving-summary.png" ] && cp "$RAW/serving-summary.png" "$OUT/"
exit "$FAILED"
