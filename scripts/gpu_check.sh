#!/usr/bin/env bash
# One command for a CUDA machine, every GPU path in turn:
#  1. scripts/gpu_check.py: embedding images/s of a ViT-H/14-sized model in bf16, and top-k over
#     500K x 1024 concepts with each available backend (torch, faiss-gpu, faiss-cpu); torch only.
#  2. scripts/gpu_check_embed_stage.py: the whole embed stage (ingest + embed on a local Ray with
#     the GPU, ViT-H-14-quickgelu with random weights, 20,000 synthetic images), its images/s against
#     the model's own forward rate; needs the project's dependencies (ray, open_clip).
#  3. scripts/gpu_check_train.py: the trainer (FSDP2 bf16, ~0.5B parameters, packed 8K sequences:
#     tokens/s and MFU; needs CUDA, not in --dry-run).
# A part that fails does not stop the later ones (one call should measure every path); the exit
# status is that of the last part that failed.
#   scripts/gpu_check.sh             # on a GPU machine
#   scripts/gpu_check.sh --dry-run   # tiny CPU smoke test of the scripts themselves
# PYTHON=/path/to/python overrides the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
dry=""
[[ " $* " == *" --dry-run "* ]] && dry="--dry-run"
status=0
"$py" scripts/gpu_check.py "$@" || status=$?
"$py" scripts/gpu_check_embed_stage.py $dry || status=$?
if [[ -z "$dry" ]]; then
  "$py" scripts/gpu_check_train.py || status=$?
fi
exit "$status"
