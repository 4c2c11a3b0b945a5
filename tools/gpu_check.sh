#!/usr/bin/env bash
# The GPU acceptance check on the lent GPU machine (no package registry there): install the carried
# wheels (.whl/, see docs/performance.md "GPU acceptance check") into .site, then run tools/gpu_check.py
# under a timeout. Extra arguments go to gpu_check.py, e.g. `bash tools/gpu_check.sh --nproc 2`.
# Output: the JSON on stdout and in gpu_check.json; the log in gpu_check.log ($OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
if [ ! -d .whl ] || ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu_check.sh: error: no wheels in .whl/ (carry deepspeed, megatron-core, webdataset and their needs)" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target "$PWD/.site" .whl/*.whl
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout "${GPU_CHECK_TIMEOUT_S:-480}" python3 tools/gpu_check.py --out "$out_dir/gpu_check.json" "$@" \
  2> "$out_dir/gpu_check.log"
