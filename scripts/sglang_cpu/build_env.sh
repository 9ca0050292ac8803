#!/usr/bin/env bash
# Builds the CPU SGLang environment the tests run real servers from (default .venv-sglang, beside .venv):
# sglang 0.5.23 and its own pinned torch / transformers, which cannot live in .venv beside this project's pins.
#   - torch's PyPI build (CUDA build; it runs on CPU);
#   - sglang with --no-deps, then requirements.txt: sglang's own requirements without the CUDA-only kernels
#     (torchaudio, torchcodec, flash-attn-4, flashinfer-python, humming-kernels, nvidia-cutlass-dsl, nvidia-mathdx,
#     nvshmem4py-cu13, quack-kernels, sgl-deep-ep, sgl-deep-gemm, sgl-flash-mla, sglang-kernel, tilelang),
#     every version pinned (a `pip freeze` of a working build);
#   - sgl_kernel_cpu/: our pure-torch stand-in for the few sgl_kernel functions sglang imports on CPU.
# Cached: the stamp $VENV/.installed holds a hash of the pins, the stand-in and this script; a matching stamp
# means nothing to do (a few ms). Measured here: 3 min 58 s (idle-ish) to 24 min (load 20-200), 7.0 GB.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-sglang}
HERE=scripts/sglang_cpu
PINS=$HERE/requirements.txt
key=$(cat "$PINS" "$HERE/build_env.sh" "$HERE/sgl_kernel_cpu/pyproject.toml" "$HERE"/sgl_kernel_cpu/sgl_kernel/*.py \
      | sha256sum | cut -c1-16)
if [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$key" ]; then
    exit 0
fi
PY312=$(bash scripts/find_python312.sh)
test -n "$PY312" || { echo "error: need Python >= 3.12 for $VENV (sglang 0.5.23 wheels are cp312)" >&2; exit 1; }
echo "building $VENV (sglang on CPU for the real-server tests; a few minutes, ~7 GB)" >&2
rm -rf "$VENV"  # stale or half-built: start clean
"$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q --no-deps "$(grep -E '^sglang==' "$PINS")"
grep -v -E '^sglang==' "$PINS" > "$VENV/requirements-deps.txt"
# pip then prints "ERROR: ... sglang 0.5.23 requires flash-attn-4 ..., which is not installed" for the kernels
# left out on purpose; it exits 0.
"$VENV/bin/pip" install -q -r "$VENV/requirements-deps.txt"
"$VENV/bin/pip" install -q --no-deps "$HERE/sgl_kernel_cpu"
# the server's import chain on CPU, without starting one (fails here, not in the middle of the tests)
SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c "import sgl_kernel, sglang.srt.mem_cache.allocation, sglang.launch_server"
echo "$key" > "$VENV/.installed"
