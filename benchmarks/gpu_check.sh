#!/usr/bin/env bash
# FLUX AnyStory on a CUDA GPU with no hub access: peak VRAM and per-step time per low-VRAM mode, real shapes,
# random weights (benchmarks/gpu_check.py). Under 10 minutes on one GPU; pass --modes to choose the modes, e.g.
#   bash benchmarks/gpu_check.sh --modes full,model,group,8bit-model,4bit-model --steps 4 --subjects 2
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 590 python -m benchmarks.gpu_check --device cuda --shape real "$@"
