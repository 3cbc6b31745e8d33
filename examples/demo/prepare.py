"""Stage 1 of the demo model: corpus, BPE tokenizer, and the randomly initialised small gpt-oss.

    python examples/demo/prepare.py [--out runs/demo] [--num 12000] [--seed 0]
    ossrl sft examples/demo/sft.toml                    # stage 2: the whole grammar (GPU, ~3 min)
    ossrl sft examples/demo/sft-pool.toml               # stage 2b: narrowed to 32 plans (CPU, ~8 min)
    python examples/demo/finish.py runs/demo/sft-pool/final   # stage 3: measure and ship

Writes OUT/corpus.jsonl (training conversations), OUT/heldout.jsonl (same grammar, another
seed), OUT/pool.jsonl and OUT/pool-heldout.jsonl (the grammar narrowed to 32 plans, stage 2b),
and OUT/init/: a Hugging Face gpt-oss directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, ...) with random weights and a byte-level BPE tokenizer
trained on the corpus, whose 21 harmony special tokens follow the BPE vocabulary in the order of
`GPT_OSS_SPECIAL_TOKENS` (as in the real o200k_harmony, where they follow 199998 BPE tokens).

The one thing to know: everything is seeded; running this twice writes identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ossrl.envs.game2048_corpus import make_corpus
from ossrl.model.chat import render_training_text
from ossrl.model.loading import save_model
from ossrl.model.tokenizer import GPT_OSS_SPECIAL_TOKENS, load_tokenizer
from ossrl.testing import random_model, tiny_config

# The demo architecture: gpt-oss exactly (sinks, sliding-128 on even layers, YaRN, top-2 of 4
# experts with clamped SwiGLU), at a size where GRPO on 2 CPU cores takes ~15 s a step.
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
             sliding_window=128, max_position_embeddings=4096)
BPE_VOCAB = 2048  # BPE tokens (bytes included); the 21 special tokens come after


def write_jsonl(rows, path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_tokenizer(texts: list[str], out_dir: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(GPT_OSS_SPECIAL_TOKENS))
    tok.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
              "clean_up_tokenization_spaces": False, **special}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_initial_model(out_dir: Path, seed: int) -> None:
    tok = load_tokenizer(out_dir)
    ids = {n: tok.token_id(n) for n in ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>")}
    vocab = -(-len(tok) // 64) * 64  # embedding rows padded to a multiple of 64, like gpt-oss
    config = tiny_config(**MODEL, vocab_size=vocab, eos_token_id=ids["<|return|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|startoftext|>"])
    model = random_model(config, seed=seed, dtype=torch.float32)
    with torch.no_grad():  # small output layer at start: initial predictions near uniform
        model.lm_head.weight.mul_(0.1)
    save_model(model, out_dir)
    generation = {"bos_token_id": ids["<|startoftext|>"], "do_sample": True,
                  "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
                  "pad_token_id": ids["<|endoftext|>"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    n = sum(p.numel() for p in model.parameters())
    print(f"initial model: {n:,} parameters, vocab {len(tok)} (embedding {vocab}) -> {out_dir}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="corpus, tokenizer and initial model of the demo")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--num", type=int, default=12000, help="training conversations")
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "init").mkdir(parents=True, exist_ok=True)
    train = make_corpus(args.num, seed=args.seed)
    heldout = make_corpus(args.heldout, seed=args.seed + 1_000_003)
    write_jsonl(train, out / "corpus.jsonl")
    write_jsonl(heldout, out / "heldout.jsonl")
    # Stage 2b's data: the same grammar narrowed to a pool of 32 plans (see game2048_corpus).
    write_jsonl(make_corpus(args.num // 4, seed=args.seed + 1, pool_seed=args.seed), out / "pool.jsonl")
    write_jsonl(make_corpus(args.heldout, seed=args.seed + 2_000_003, pool_seed=args.seed),
                out / "pool-heldout.jsonl")
    texts = [render_training_text(r["messages"], reasoning_effort="low") for r in train]
    train_tokenizer(texts, out / "init")
    write_initial_model(out / "init", args.seed)
    tok = load_tokenizer(out / "init")
    lengths = sorted(len(tok.encode(t)) for t in texts[:2000])
    print(f"corpus: {len(train)} train / {len(heldout)} held-out conversations; tokens per conversation "
          f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}")


if __name__ == "__main__":
    sys.exit(main())
