#!/usr/bin/env bash
# Rebuild the bundled demo model (ossrl/demo_model) from nothing, deterministically (seed 0).
#   bash examples/demo/build.sh            # SFT on CUDA when available (~3 min on one H100), else CPU (hours)
# Stages: prepare.py (corpus, BPE tokenizer, random init) -> ossrl sft (whole grammar, GPU) ->
# ossrl sft sft-pool.toml (narrowed to 32 plans, CPU) -> finish.py (measure, ship bf16). docs/demo.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
$PY examples/demo/prepare.py --out runs/demo --num 12000 --seed 0
$PY -m ossrl.cli sft examples/demo/sft.toml
$PY -m ossrl.cli sft examples/demo/sft-pool.toml
$PY examples/demo/finish.py runs/demo/sft-pool/final --ship ossrl/demo_model --heldout runs/demo/pool-heldout.jsonl \
    --prompts 4 --n 8 --card examples/demo/card.json
