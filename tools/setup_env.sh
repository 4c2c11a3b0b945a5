#!/usr/bin/env bash
# Create .venv and install mcd_scale with the CPU-verified pins. Idempotent; safe to re-run.
# torch is installed first and pinned: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
# DeepSpeed JIT-builds its CPU shared-memory comm op on first init (~25 s); build it once here, into
# this checkout's own cache, so tests and demos don't pay (or race for) it.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
DS_ACCELERATOR=cpu .venv/bin/python - <<'PY'
import os, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
print("mcd_scale environment ready:", deepspeed.__version__)
PY
