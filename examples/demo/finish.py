"""Stage 3 of the demo model: measure an SFT checkpoint and write the shipped copy.

    python examples/demo/finish.py runs/demo/sft/final [--ship ossrl/demo_model] [--samples 64]

Writes the checkpoint with bf16 weights (as gpt-oss ships) to --ship, with the tokenizer files,
then measures *the shipped weights* (loaded back in fp32): the mean loss per assistant token on
runs/demo/heldout.jsonl (the corpus grammar, another seed) and the rewards of completions
sampled at temperature 1 from the 2048 prompt, as GRPO's first step would see them. Prints a
JSON summary (docs/demo.md quotes it) and writes it to SHIP/../demo_model_card.json when asked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from ossrl.engine.engine import RolloutEngine
from ossrl.engine.sampling import SamplingParams
from ossrl.envs import rewards as R
from ossrl.envs.tasks import make_2048_dataset
from ossrl.model.chat import assistant_stop_token_ids, render_prompt
from ossrl.model.loading import load_model, save_model
from ossrl.model.tokenizer import load_tokenizer
from ossrl.train.logprobs import pack_sequences, sequence_logprobs
from ossrl.train.sft import read_conversations, tokenize_conversations

EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def ship(src: Path, dst: Path) -> None:
    model = load_model(src, dtype=torch.float32)
    if dst.exists():
        shutil.rmtree(dst)
    save_model(model.to(torch.bfloat16), dst)
    for name in EXTRA_FILES:
        shutil.copyfile(src / name, dst / name)


@torch.no_grad()
def heldout_loss(model, tokenizer, path: Path, batch: int = 32) -> float:
    seqs, masks, _ = tokenize_conversations(tokenizer, read_conversations(path), reasoning_effort="low",
                                            max_length=1024)
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        packed = pack_sequences(seqs[i:i + batch], masks[i:i + batch], max_tokens=1024)
        logprobs, _ = sequence_logprobs(model, packed)
        total -= float(logprobs.sum())
        count += logprobs.numel()
    return total / count


def sampled_rewards(model, tokenizer, prompts: int, n: int, seed: int = 0) -> dict:
    rows = make_2048_dataset(prompts, seed=seed + 1)
    engine = RolloutEngine(model)
    params = SamplingParams(temperature=1.0, max_new_tokens=768, seed=seed,
                            stop_token_ids=assistant_stop_token_ids(tokenizer))
    ids = [render_prompt(tokenizer, r["prompt"], reasoning_effort="low") for r in rows]
    groups = engine.generate(ids, n=n, params=params)
    completions = [tokenizer.decode(c.token_ids) for g in groups for c in g]
    seeds = [r["seed"] for r in rows for _ in range(n)]
    out = {"completions": len(completions),
           "mean_tokens": statistics.fmean(len(c.token_ids) for g in groups for c in g)}
    for name, fn in (("function_works", R.game2048_function_works), ("no_cheating", R.game2048_no_cheating),
                     ("strategy_succeeds", R.game2048_strategy_succeeds)):
        values = fn(completions=completions, seed=seeds)
        out[name] = round(statistics.fmean(values), 3)
    results = R.strategy_results(completions, seed=seeds)
    out["mean_max_tile"] = round(statistics.fmean(r.mean_max_tile for r in results), 1)
    out["frac_code_loads"] = round(statistics.fmean(r.loaded for r in results), 3)
    out["distinct_programs"] = len({r for r in (R.extract_python_function(c, "strategy") for c in completions) if r})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="measure and ship the demo model")
    parser.add_argument("checkpoint")
    parser.add_argument("--ship", default="ossrl/demo_model")
    parser.add_argument("--heldout", default="runs/demo/heldout.jsonl")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--card", default=None, help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    src, dst = Path(args.checkpoint), Path(args.ship)
    ship(src, dst)
    model = load_model(dst, dtype=torch.float32)
    tokenizer = load_tokenizer(dst)
    start = time.time()
    summary = {"checkpoint": str(src), "shipped": str(dst),
               "parameters": sum(p.numel() for p in model.parameters()),
               "bytes": sum(f.stat().st_size for f in dst.iterdir()),
               "heldout_loss": round(heldout_loss(model, tokenizer, Path(args.heldout)), 4)}
    summary["sampled"] = sampled_rewards(model, tokenizer, args.prompts, args.n)
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary, indent=2))
    if args.card:
        Path(args.card).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
