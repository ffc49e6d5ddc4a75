#!/usr/bin/env bash
# One short GPU check (< 8 minutes on one GPU): bf16 vs fp32, sdpa vs eager, CPU vs CUDA, generation on the GPU,
# 20 bf16 SFT steps (DeepSpeed ZeRO-2 when installed), peak memory. Everything goes under one folder:
#   scripts/gpu_check.sh [OUT_DIR]      (default runs/gpu_check)
# On a machine without a CUDA GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
mkdir -p "$out"
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $python (torch.cuda.is_available() is False); nothing to check"
    exit 0
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
PYTHONUNBUFFERED=1 "$python" scripts/gpu_check.py "$out" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check: results in $out/gpu_check.json (exit $status)"
exit "$status"
