"""Reward functions: TRL's contract, graded scales, one shared evaluation per step, no raising."""

import json
import time
from pathlib import Path

import pytest

from ossrl.configs import load_config
from ossrl.envs import rewards
from ossrl.envs.matmul import FAST_KERNEL, NAIVE_KERNEL, WRONG_KERNEL, KernelResult
from ossrl.envs.pool import RESULTS, LRUCache
from ossrl.envs.registry import REWARD_FUNCS
from ossrl.envs.strategy import ALWAYS_W_STRATEGY, CORNER_STRATEGY, RANDOM_STRATEGY
from ossrl.envs.tasks import make_2048_dataset, make_matmul_dataset, prompt_2048, render_task_prompt
from ossrl.rl.config import GRPOConfig
from ossrl.rl.rewards import compute_rewards, resolve_reward_func

ROOT = Path(__file__).resolve().parent.parent
GAME_FUNCS = [REWARD_FUNCS[f"2048.{n}"] for n in ("function_works", "no_cheating", "strategy_succeeds")]
KERNEL_FUNCS = [REWARD_FUNCS[f"matmul.{n}"] for n in ("function_works", "no_cheating", "correctness", "speed")]


def answer(code: str) -> str:
    """A harmony completion whose final channel holds `code` in a fenced block."""
    return ("<|channel|>analysis<|message|>Think about it.<|end|><|start|>assistant<|channel|>final"
            f"<|message|>Here you go:\n```python\n{code}```<|return|>")


def call(fn, completions, **columns):
    n = len(completions)
    columns = {"games": [4] * n, "max_moves": [300] * n, **columns}
    return fn(prompts=["p"] * n, completions=completions, completion_ids=[[1]] * n, **columns)


def test_registered_names_resolve_for_configs():
    assert set(REWARD_FUNCS) == {"2048.function_works", "2048.no_cheating", "2048.strategy_succeeds",
                                 "matmul.function_works", "matmul.no_cheating", "matmul.correctness", "matmul.speed"}
    for name, fn in REWARD_FUNCS.items():
        assert resolve_reward_func(name) is fn
    assert len({fn.__name__ for fn in REWARD_FUNCS.values()}) == len(REWARD_FUNCS)  # distinct metric names


def test_reference_strategies_are_ordered_by_strategy_succeeds():
    raising = "def strategy(board):\n    raise ValueError('no')\n"
    sources = [CORNER_STRATEGY, RANDOM_STRATEGY, ALWAYS_W_STRATEGY, raising]
    completions = [answer(s) for s in sources] + ["I cannot do that."]
    works, clean, success = (call(fn, completions, seed=[5] * 5) for fn in GAME_FUNCS)
    corner, rand, always_w, raises, nothing = success
    assert corner > rand + 1.0 > always_w + 3.0, success
    assert always_w > raises > nothing == -2.0
    assert works == [1.0, 1.0, 1.0, -0.5, -2.0]
    assert clean == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_one_evaluation_per_distinct_candidate_shared_by_all_functions(monkeypatch):
    calls = []
    real = rewards.evaluate_strategy

    def counting(source, **kw):
        calls.append(source)
        return real(source, **kw)

    monkeypatch.setattr(rewards, "evaluate_strategy", counting)
    RESULTS.clear()
    completions = [answer(CORNER_STRATEGY), answer(CORNER_STRATEGY), "prose " + answer(CORNER_STRATEGY),
                   answer(ALWAYS_W_STRATEGY)]
    seeds = [1, 1, 1, 2]
    results = [call(fn, completions, seed=seeds) for fn in GAME_FUNCS]
    assert len(calls) == 2 + 0 and sorted(calls) == sorted([CORNER_STRATEGY.strip("\n") + "\n",
                                                           ALWAYS_W_STRATEGY.strip("\n") + "\n"])
    assert results[2][0] == results[2][1] == results[2][2]  # one group, same boards, same answer
    call(GAME_FUNCS[2], completions, seed=[9, 9, 9, 9])  # a new seed is a new evaluation
    assert len(calls) == 4


def test_distinct_candidates_are_evaluated_in_parallel():
    sleeper = "import time\ndef strategy(board):\n    time.sleep(0.1)\n    return 'WASD'[len(str(board)) % 4]\n"
    completions = [answer(sleeper + f"# variant {i}\n") for i in range(4)]
    start = time.monotonic()
    values = call(GAME_FUNCS[2], completions, games=[1] * 4, max_moves=[4] * 4, seed=[123] * 4)
    elapsed = time.monotonic() - start
    assert all(v > 0 for v in values)
    assert elapsed < 0.9 * 4 * 0.4, f"4 candidates x 0.4 s took {elapsed:.2f} s"


def test_lru_cache_is_bounded():
    cache = LRUCache(maxsize=3)
    for i in range(5):
        cache.put(i, str(i))
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == "4"
    cache.get(2)
    cache.put(5, "5")
    assert cache.get(2) == "2" and cache.get(3) is None


GARBAGE = [
    None, "", 12345, "<|channel|>final<|message|>", "x" * 300_000,
    answer("def strategy(board)\n    return 'W'\n"),                      # syntax error
    answer("def strategy(board):\n    while True:\n        pass\n"),       # infinite loop
    answer("def strategy(board):\n    return 42\n"),                      # non-string
    answer("def strategy(board):\n    return {'W'}\n"),                   # not plain data
    answer("def strategy(board):\n    print('y' * 10**6)\n    return 'W' * 10**6\n"),  # huge output
    answer("import os\ndef strategy(board):\n    return 'W'\n"),          # forbidden import
    answer("def strategy(board):\n    return getattr(board, '__cl' + 'ass__')\n"),  # runtime refusal
    answer("def strategy(board):\n    return [0] * (10 ** 9)\n"),         # memory
    "<|channel|>analysis<|message|>```python\n" + ALWAYS_W_STRATEGY + "```",  # no final channel
]


def test_garbage_completions_get_penalties_and_never_raise():
    works, clean, success = (call(fn, GARBAGE) for fn in GAME_FUNCS)
    for values in (works, clean, success):
        assert len(values) == len(GARBAGE) and all(isinstance(v, float) for v in values)
    assert works[:5] == [-2.0] * 5 and works[-1] == -2.0
    assert works[5] == -1.0 and works[10] == -1.0
    assert works[6] == -0.5 and works[11] == -0.5 and works[12] == -0.5
    assert clean[10] == clean[11] == -3.0 and clean[6] == clean[7] == 1.0 and clean[0] == 0.0
    honest_w = call(GAME_FUNCS[2], [answer(ALWAYS_W_STRATEGY)])[0]
    assert max(success) < honest_w
    assert success[7] == success[8] == success[9] == -1.5  # loaded, every answer invalid: floor
    assert success[6] < 0 and success[0] == success[5] == success[10] == -2.0


def test_rewards_through_compute_rewards_like_the_trainer():
    rows = make_2048_dataset(2, seed=0)
    completions = [answer(CORNER_STRATEGY), answer(RANDOM_STRATEGY)]
    result = compute_rewards(GAME_FUNCS, [1.0, 1.0, 1.0], prompts=[r["prompt"] for r in rows],
                             completions=completions, completion_ids=[[1, 2], [3]],
                             columns={"seed": [r["seed"] for r in rows], "games": [2, 2], "max_moves": [200, 200]})
    assert not result.errors
    assert set(result.per_func) == {"game2048_function_works", "game2048_no_cheating", "game2048_strategy_succeeds"}
    assert result.total[0] > 2 + 7 and result.total[1] > 2


def test_matmul_rewards_order_kernels():
    timeout = answer("def matmul(A, B):\n    while True:\n        pass\n")
    completions = [answer(FAST_KERNEL), answer(NAIVE_KERNEL), answer(WRONG_KERNEL), "no code", timeout]
    works, clean, correct, speed = (call(fn, completions, seed=[3] * 5) for fn in KERNEL_FUNCS)
    assert works == [1.0, 1.0, 1.0, -2.0, -0.5]
    assert clean == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert correct[:3] == [2.0, 2.0, -1.0] and correct[3] == -2.0 and -1.0 <= correct[4] < 0
    assert speed[2] == speed[3] == speed[4] == -3.0
    # Timed, so no threshold (CI shares 2 cores; fresh-clone runs read the FAST kernel's reward as
    # low as 0.24 where a quiet machine reads 1-2): only the order, with up to two more tries.
    for _ in range(2):
        if speed[0] > speed[1]:
            break
        speed = call(KERNEL_FUNCS[3], completions[:2], seed=[3] * 2)
    assert speed[0] > speed[1] and all(-3.0 < s <= 3.0 for s in speed[:2]), speed


def test_speed_reward_is_log2_of_the_speedup_clipped_and_only_for_correct_kernels():
    speed_reward = rewards.speed_reward

    def result(speedup, correct=True):
        return KernelResult(ok=True, loaded=True, correct=correct, speedup=speedup)

    assert speed_reward(result(1.0)) == 0.0 and speed_reward(result(4.0)) == 2.0
    assert speed_reward(result(0.5)) == -1.0 and speed_reward(result(2 ** 0.3)) == pytest.approx(0.3)
    assert speed_reward(result(100.0)) == 3.0 and speed_reward(result(1e-3)) == -3.0
    assert speed_reward(result(4.0, correct=False)) == -3.0 and speed_reward(result(None)) == -3.0


def test_datasets_have_per_row_seeds_and_the_shipped_jsonl_is_current():
    rows = make_2048_dataset(64, seed=0)
    assert len({r["seed"] for r in rows}) == 64 and rows == make_2048_dataset(64, seed=0)
    assert rows[0]["prompt"] == prompt_2048() and "strategy(board)" in rows[0]["prompt"]
    shipped = [json.loads(line) for line in (ROOT / "examples/2048-prompts.jsonl").read_text().splitlines()]
    assert shipped == rows, "regenerate with: python -m ossrl.envs.tasks 2048 64 examples/2048-prompts.jsonl"
    assert "matmul(A, B)" in make_matmul_dataset(1)[0]["prompt"]
    text = render_task_prompt(rows[0]["prompt"], reasoning_effort="high")
    assert "Reasoning: high" in text and text.endswith("<|start|>assistant")


def test_matmul_example_config_is_valid_and_its_dataset_is_current():
    config = load_config(GRPOConfig, ROOT / "examples" / "matmul.toml", [])
    assert [resolve_reward_func(f) for f in config.reward_funcs] == [
        rewards.matmul_function_works, rewards.matmul_no_cheating, rewards.matmul_correctness, rewards.matmul_speed]
    assert len(config.reward_weights) == len(config.reward_funcs)
    shipped = [json.loads(line) for line in (ROOT / config.dataset).read_text().splitlines()]
    assert shipped == make_matmul_dataset(64, seed=0), \
        "regenerate with: python -m ossrl.envs.tasks matmul 64 examples/matmul-prompts.jsonl"


@pytest.mark.parametrize("name", ["2048.toml", "2048-tiny.toml", "2048-120b-fsdp.toml"])
def test_example_configs_are_valid_grpo_configs(name):
    config = load_config(GRPOConfig, ROOT / "examples" / name, [])
    funcs = [resolve_reward_func(f) for f in config.reward_funcs]  # every name resolves
    assert funcs[: len(GAME_FUNCS)] == GAME_FUNCS  # the three 2048 rewards come first (extras may follow)
    assert config.dataset == "examples/2048-prompts.jsonl"
