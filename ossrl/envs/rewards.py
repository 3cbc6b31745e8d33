"""Reward functions for the 2048 and matmul environments, with TRL's contract:

    fn(prompts, completions, completion_ids, **columns) -> list[float]

Registered by short name in `ossrl.envs.registry` ("2048.strategy_succeeds", ...). Each one
extracts the candidate from the completion's final channel (`code.extract_python_function`),
evaluates every *distinct* (source, seed, env parameters) once per process through the shared
sandbox pool, in parallel, with results kept in a bounded LRU cache (`pool.RESULTS`), so the
functions of one step share one evaluation. They never raise on garbage input.

Scales (the one thing to know when weighting them):

    function_works      -2 no code in the answer | -1 does not compile/load or refused |
                        -0.5 loaded but raised, timed out or crashed while running | +1 ran cleanly
    no_cheating          0 no code | -3 refused import/construct, statically or at run time | +1
    strategy_succeeds   -2 when the strategy did not load; else, averaged over the games,
                        log2(max tile) + 0.25 * log2(1 + score) + 4 * (fraction won)
                        - 3 * (fraction of invalid answers) - 3 * (fraction of games ended by an
                        exception) - 3 if a move timed out / ran out of memory / crashed / was refused,
                        floored at -1.5 (so any strategy that loads beats one that does not)
    correctness         -2 did not load | fraction of shapes correct - 1 (in [-1, 0)) | +2 all correct
    speed               log2(speedup over the naive triple loop) clipped to [-3, 3]; -3 if not correct

Dataset columns they read (all optional): `seed` (int: groups of one prompt share it, so they
play the same boards / get the same matrices), and for 2048 `games`, `board_size`, `target`,
`max_moves`.
"""

from __future__ import annotations

import math

from ossrl.envs.code import extract_python_function
from ossrl.envs.matmul import KernelResult, evaluate_kernel
from ossrl.envs.pool import evaluate_cached
from ossrl.envs.strategy import StrategyResult, evaluate_strategy

# Defaults of one evaluation inside training (a dataset column overrides each).
GAME_DEFAULTS = {"games": 8, "board_size": 4, "target": 2048, "max_moves": 2000}
MATMUL_DEFAULTS = {"sizes": (32, 64), "trials": 7}
FATAL = ("timeout", "memory", "crash", "forbidden")  # the worker was killed mid-evaluation


def _column(columns: dict, name: str, i: int, default):
    values = columns.get(name)
    if isinstance(values, (list, tuple)) and i < len(values) and values[i] is not None:
        return values[i]
    return default


def _as_int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _strategy_key(source, columns, i):
    seed = _as_int(_column(columns, "seed", i, 0), 0)
    return ("2048", source, seed,
            *(_as_int(_column(columns, k, i, v), v) for k, v in GAME_DEFAULTS.items()))


def _run_strategy(key) -> StrategyResult:
    _, source, seed, games, size, target, max_moves = key
    return evaluate_strategy(source, games=games, seed=seed, size=size, target=target, max_moves=max_moves)


def strategy_results(completions, **columns) -> list[StrategyResult]:
    """The (cached) StrategyResult of every completion."""
    sources = [extract_python_function(c, "strategy") for c in completions]
    keys = [_strategy_key(s, columns, i) for i, s in enumerate(sources)]
    return evaluate_cached(keys, _run_strategy)


def _kernel_key(source, columns, i):
    return ("matmul", source, _as_int(_column(columns, "seed", i, 0), 0),
            tuple(MATMUL_DEFAULTS["sizes"]), MATMUL_DEFAULTS["trials"])


def _run_kernel(key) -> KernelResult:
    _, source, seed, sizes, trials = key
    return evaluate_kernel(source, sizes=sizes, seed=seed, trials=trials)


def kernel_results(completions, **columns) -> list[KernelResult]:
    """The (cached) KernelResult of every completion."""
    sources = [extract_python_function(c, "matmul") for c in completions]
    keys = [_kernel_key(s, columns, i) for i, s in enumerate(sources)]
    return evaluate_cached(keys, _run_kernel)


# ---------------------------------------------------------------- shared scales
def works_reward(result) -> float:
    if result.error is None:
        return 1.0
    category = result.error[0]
    if category == "no_code":
        return -2.0
    if not result.loaded:
        return -1.0
    return -0.5


def cheating_reward(result) -> float:
    if result.error is not None and result.error[0] == "forbidden":
        return -3.0
    if result.error is not None and result.error[0] == "no_code":
        return 0.0
    return 1.0


def strategy_reward(result: StrategyResult) -> float:
    if not result.loaded or not result.games:
        return -2.0
    reward = (result.mean_log2_max_tile + 0.25 * result.mean_log2_score
              + 4.0 * result.games_won / result.games
              - 3.0 * result.invalid_fraction
              - 3.0 * result.exceptions / result.games
              - 3.0 * (result.error is not None and result.error[0] in FATAL))
    return max(reward, -1.5)


def correctness_reward(result: KernelResult) -> float:
    if not result.loaded:
        return -2.0
    if result.correct:
        return 2.0
    return result.shapes_correct / max(result.shapes_checked, 1) - 1.0


def speed_reward(result: KernelResult) -> float:
    if not result.correct or not result.speedup:
        return -3.0
    return min(3.0, max(-3.0, math.log2(result.speedup)))


# ---------------------------------------------------------------- the reward functions
def _safe(score, results_of, completions, columns) -> list[float]:
    completions = list(completions or [])
    return [float(score(r)) for r in results_of(completions, **columns)]


def game2048_function_works(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    return _safe(works_reward, strategy_results, completions, columns)


def game2048_no_cheating(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    return _safe(cheating_reward, strategy_results, completions, columns)


def game2048_strategy_succeeds(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    return _safe(strategy_reward, strategy_results, completions, columns)


def matmul_function_works(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    return _safe(works_reward, kernel_results, completions, columns)


def matmul_no_cheating(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    return _safe(cheating_reward, kernel_results, completions, columns)


def matmul_correctness(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    return _safe(correctness_reward, kernel_results, completions, columns)


def matmul_speed(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    return _safe(speed_reward, kernel_results, completions, columns)
