#!/usr/bin/env bash
# Builds .carry/, what bench/gpu_serving.sh installs on a GPU machine that has no package registry
# (python 3.12, x86-64): the nvidia-pytriton 0.7.0 Triton server trimmed to fit the device tool's
# 64 MiB carry limit, tritonclient 2.51 with perf_analyzer, and the wheels the server's stub and the
# client need there. Run it here, where pip and apt reach their registries:
#
#   bash bench/make_gpu_carry.sh          # then: run(command="bash bench/gpu_serving.sh", carry=[".carry"])
#
# .carry/ is ignored by git (add `/.carry/` to .git/info/exclude once).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CARRY="${CARRY:-$REPO/.carry}"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
PY="${PYTHON:-python3}"

echo "downloading cp312 wheels into $STAGE/whl" >&2
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$STAGE/whl" "$@"
}
# numpy < 2: the wheel's Python backend stub is built against numpy 1 (with 2 it dies on the first
# BYTES input); protobuf < 5: tritonclient 2.51's gRPC stubs ask for it.
download nvidia-pytriton==0.7.0 tritonclient==2.51.0 numpy==1.26.4 python-rapidjson==1.25 protobuf==4.25.9

echo "trimming the server" >&2
T="$STAGE/tree"
mkdir -p "$T/srv" "$T/client" "$T/bin" "$T/wheels"
unzip -q "$STAGE"/whl/nvidia_pytriton-*.whl -d "$STAGE/pytriton"
P="$STAGE/pytriton"
# Only tritonserver and the 3.12 stub are needed; scripts/serve.py imports `pytriton` just to find them.
mkdir -p "$T/srv/pytriton" "$T/srv/nvidia_pytriton-0.7.0.dist-info"
: > "$T/srv/pytriton/__init__.py"
mkdir -p "$T/srv/pytriton/tritonserver/python_backend_stubs"
for d in bin backends caches; do cp -a "$P/pytriton/tritonserver/$d" "$T/srv/pytriton/tritonserver/"; done
cp -a "$P/pytriton/tritonserver/python_backend_stubs/3.12" "$T/srv/pytriton/tritonserver/python_backend_stubs/"
cp -a "$P/nvidia_pytriton.libs" "$T/srv/"
rm -f "$T"/srv/nvidia_pytriton.libs/libpython3*.13*
cp "$P"/nvidia_pytriton-0.7.0.dist-info/METADATA "$T/srv/nvidia_pytriton-0.7.0.dist-info/"

echo "unpacking the client and perf_analyzer" >&2
unzip -q "$STAGE"/whl/tritonclient-*.whl -d "$STAGE/client"
cp -a "$STAGE"/client/tritonclient-2.51.0.data/purelib/. "$STAGE"/client/tritonclient-2.51.0.dist-info "$T/client/"
cp "$STAGE"/client/tritonclient-2.51.0.data/data/bin/perf_analyzer "$T/bin/"

mkdir -p "$CARRY/wheels"
cp "$STAGE"/whl/numpy-* "$STAGE"/whl/python_rapidjson-* "$STAGE"/whl/protobuf-* "$CARRY/wheels/"
(cd "$CARRY" && apt-get download -q libb64-0d 2>/dev/null)       # perf_analyzer links libb64
echo "compressing (xz -9e; a few minutes)" >&2
tar -C "$T" -cf - srv client bin | xz -9e -T0 > "$CARRY/triton-2.51-cp312.tar.xz"
du -sh "$CARRY" >&2
