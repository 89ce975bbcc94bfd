#!/usr/bin/env bash
# One short script for a CUDA machine (about 6 minutes): the CUDA-marked tests, bf16
# throughput and peak memory of frozen-backbone vs full fine-tuning (resnet50, batch 64),
# the cached-feature speed-up, and the strategies table as a smoke run on cuda (one draw,
# 4 epochs: the fixed strategies and auto through the runner, bf16 autocast). Run from the
# repository root after `pip install -e ".[dev]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
echo "## CUDA-marked tests"
python -m pytest -m cuda -n 0 -q -p no:cacheprovider tests
echo "## frozen vs full fine-tuning"
python benchmarks/gpu_bench.py --device cuda --arch resnet50 --batch 64 --steps 30
echo "## cached features"
python benchmarks/bench_finetune.py cache
echo "## strategies (quick, cuda)"
python benchmarks/bench_finetune.py strategies --quick --device cuda
