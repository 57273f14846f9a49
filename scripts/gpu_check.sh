#!/usr/bin/env bash
# One command for a CUDA machine: embedding images/s of a ViT-H/14-sized model in bf16, and
# top-k over 500K x 1024 concepts with each available backend (torch, faiss-gpu, faiss-cpu), then
# the trainer check (scripts/gpu_check_train.py).
# Needs only torch (open_clip and faiss are used when installed; ray is not needed).
#   scripts/gpu_check.sh             # on a GPU machine
#   scripts/gpu_check.sh --dry-run   # tiny CPU smoke test of the script itself
# PYTHON=/path/to/python overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" scripts/gpu_check.py "$@"
# Trainer: FSDP2 bf16, ~0.5B parameters, packed 8K sequences: tokens/s and MFU (needs CUDA; not in --dry-run)
if [[ " $* " != *" --dry-run "* ]]; then
  exec "${PYTHON:-python3}" scripts/gpu_check_train.py
fi
