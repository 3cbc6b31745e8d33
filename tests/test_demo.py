"""The bundled demo: the strategy grammar, the shipped small gpt-oss and its tokenizer (fast checks).

The learning test (GRPO raises the reward) is tests/test_demo_learning.py.
"""

import json
import random
from pathlib import Path

import pytest
import torch

import ossrl
from ossrl.envs.code import extract_python_function, static_problem
from ossrl.envs.game2048_corpus import FAMILIES, make_corpus, sample_plan
from ossrl.envs.strategy import evaluate_strategy
from ossrl.envs.rewards import strategy_reward
from ossrl.model.chat import render_training
from ossrl.model.tokenizer import GPT_OSS_SPECIAL_TOKENS

DEMO_MODEL = Path(ossrl.__file__).parent / "demo_model"


def test_corpus_is_deterministic_and_every_answer_is_an_extractable_strategy():
    rows = make_corpus(300, seed=3)
    assert rows == make_corpus(300, seed=3)
    assert {r["family"] for r in rows} == set(FAMILIES)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and "strategy(board)" in user["content"]
        source = extract_python_function(assistant["content"], "strategy")
        assert source is not None and static_problem(source) is None, assistant["content"]


def test_grammar_spread_best_families_far_above_the_worst():
    rng = random.Random(0)
    by_family = {}
    for _ in range(60):
        plan = sample_plan(rng)
        if plan.mistake:
            continue
        result = evaluate_strategy(plan.code, games=2, seed=0)
        by_family.setdefault(plan.family, []).append(strategy_reward(result))
    mean = {f: sum(v) / len(v) for f, v in by_family.items()}
    assert mean["greedy"] > mean["constant"] + 5
    assert mean["greedy"] > mean["random"]


def test_shipped_model_is_a_small_gpt_oss_under_25_mb():
    size = sum(f.stat().st_size for f in DEMO_MODEL.iterdir())
    assert size < 25 * 2 ** 20
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["model_type"] == "gpt_oss"
    assert config["num_local_experts"] == 4 and config["experts_per_token"] == 2
    assert config["sliding_window"] == 128 and "sliding_attention" in config["layer_types"]
    model = ossrl.load_model(DEMO_MODEL, dtype=torch.float32)
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    assert all(layer.self_attn.sinks is not None for layer in model.model.layers)


def test_shipped_tokenizer_has_the_harmony_tokens_in_order_and_renders_the_corpus():
    tok = ossrl.load_tokenizer(DEMO_MODEL)
    ids = [tok.token_id(name) for name in GPT_OSS_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # after the BPE vocabulary, in order
    row = make_corpus(1, seed=0)[0]
    tokens, mask = render_training(tok, row["messages"], reasoning_effort="low")
    assert len(tokens) < 1024 and any(mask)
    assert tok.decode(tokens).count("def strategy(board):") == 1


def test_transformers_autotokenizer_agrees_with_ossrl_on_the_shipped_tokenizer():
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tok = ossrl.load_tokenizer(DEMO_MODEL)
    text = '<|start|>assistant<|channel|>final<|message|>```python\ndef strategy(board):\n    return "W"\n```<|return|>'
    assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert auto.eos_token == "<|return|>"
