#!/usr/bin/env bash
# The GPU acceptance check on the lent GPU machine (no package registry there): install the carried
# wheels (.whl/, see docs/performance.md "GPU acceptance check") into .site, then run tools/gpu_check.py
# under a timeout. Extra arguments go to gpu_check.py, e.g. `bash tools/gpu_check.sh --nproc 2`.
# Output: one JSON line per finished row on stdout and in gpu_check.jsonl; the log in gpu_check.log ($OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
if [ ! -d .whl ] || ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu_check.sh: error: no wheels in .whl/ (carry deepspeed, megatron-core, webdataset and their needs)" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target "$PWD/.site" .whl/*.whl
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# SIGTERM at the limit (the trainer's and precompute's preemption handlers are in place only while they run),
# SIGKILL 30 s later if anything still holds on: the rows already printed stay on stdout and in gpu_check.jsonl.
timeout -k "${GPU_CHECK_KILL_AFTER_S:-30}" "${GPU_CHECK_TIMEOUT_S:-480}" \
  python3 tools/gpu_check.py --out "$out_dir/gpu_check.jsonl" "$@" 2> "$out_dir/gpu_check.log"
