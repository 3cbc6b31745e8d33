#!/usr/bin/env bash
# One device call that checks before it measures (device minutes are few; see docs/notes.md):
#   bash benchmarks/gpu_check.sh [tests|grpo|train|all]      # on the GPU machine, from the repo root
# tests: every test marked gpu; grpo: benchmarks/grpo_step.py (2 steps); train: benchmarks/train.py
# at 1K/4K/8K (auto and fully checkpointed) against transformers + PEFT at 4K/8K. Logs and JSON go
# to $OUT (the device tool's folder) or /tmp/gpu_check.
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [[ $what == tests || $what == all ]]; then
    timeout 300 python -m pytest -m gpu -q -p no:cacheprovider --durations=12 -rfE 2>&1 | tee "$out/gpu_tests.log" | tail -60
fi
if [[ $what == grpo || $what == all ]]; then
    timeout 240 python benchmarks/grpo_step.py --steps 2 --out "$out/grpo_step.json" 2>&1 | tee "$out/grpo_step.log" | tail -8
fi
if [[ $what == train ]]; then
    timeout 400 python benchmarks/train.py --tokens 1024,4096,8192 --hf-tokens 4096,8192 \
        --full-checkpoint-tokens 4096 --out "$out/train.json" 2>&1 | tee "$out/train.log" | tail -20
fi
