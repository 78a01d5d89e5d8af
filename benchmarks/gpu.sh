#!/usr/bin/env bash
# The GPU checks of the performance issue, in one call on a lent GPU machine (the device
# tool's `run`), which has torch, lightning, tensorboard, matplotlib, timm and opencv but
# not grad-cam, captum or ttach, and no network. Here, first:
#   pip wheel --no-deps -w wheels grad-cam captum ttach      # wheels/ is ignored by git
# then run with carry=["wheels"] and command "bash benchmarks/gpu.sh" (about 8 minutes).
# Everything printed also lands in $OUT (or gpu_results/) and comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
ls wheels/*.whl > /dev/null || { echo "no wheels/: build them first (see the top of this file)"; exit 2; }
python3 -m pip install -q --no-deps wheels/*.whl 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"
status=0
# training bitwise unchanged with the callback, 32-true and bf16-mixed, and the memory it adds
timeout 150 python3 benchmarks/training_unchanged.py --device cuda 2>&1 \
  | grep -v "Warning\|warn(" | tee "$out/training_unchanged.txt" || status=1
# the ratios of the issue: engine (resnet18 x 8), IG against captum, auto, the demo fit
timeout 360 python3 benchmarks/overhead.py --fit --device cuda --n 8 2>&1 | tee "$out/overhead.txt" || status=1
exit "$status"
