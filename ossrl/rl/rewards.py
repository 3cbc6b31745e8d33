"""Calling reward functions with TRL's contract, robustly.

    fn(prompts, completions, completion_ids, **dataset_columns) -> list[float | None]

One call per function per step over the whole generation batch (functions that share work, like
the environments' evaluators, cache per completion). Async functions are awaited. `None` means
"not applicable" and is skipped when rewards are summed (TRL's nansum). A function that raises or
returns garbage is reported by name; its rewards for the step become None, or the run stops if
configured. Functions are named in configs as "module:function" or by a registered short name.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

RewardFunc = Callable[..., list]


def reward_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def resolve_reward_func(name: str) -> RewardFunc:
    """'package.module:function', or a short name registered by ossrl.envs."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward function {name!r} cannot be imported ({e})") from None
    else:
        from ossrl.envs.registry import REWARD_FUNCS

        if name not in REWARD_FUNCS:
            known = ", ".join(sorted(REWARD_FUNCS)) or "none registered"
            raise ValueError(f"unknown reward function {name!r}; use 'module:function' or one of: {known}")
        fn = REWARD_FUNCS[name]
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn


@dataclass
class RewardResult:
    per_func: dict[str, list[float | None]]
    total: list[float]  # weighted sum over functions, None skipped
    errors: dict[str, str] = field(default_factory=dict)


class RewardFunctionError(RuntimeError):
    pass


def compute_rewards(funcs: list[RewardFunc], weights: list[float] | None, *, prompts: list, completions: list,
                    completion_ids: list[list[int]], columns: dict[str, list], stop_on_error: bool = False
                    ) -> RewardResult:
    n = len(completions)
    weights = weights or [1.0] * len(funcs)
    per_func: dict[str, list[float | None]] = {}
    errors: dict[str, str] = {}
    for fn in funcs:
        name = reward_name(fn)
        try:
            values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            if inspect.isawaitable(values):
                values = asyncio.run(_await(values))
            values = _validate(values, n, name)
        except Exception as e:  # noqa: BLE001 - reported by name; the step goes on
            if stop_on_error:
                raise RewardFunctionError(f"reward function '{name}' failed: {type(e).__name__}: {e}") from e
            errors[name] = f"{type(e).__name__}: {e}"
            values = [None] * n
        per_func[name] = values
    total = []
    for i in range(n):
        s = 0.0
        for w, values in zip(weights, per_func.values()):
            if values[i] is not None:
                s += w * values[i]
        total.append(s)
    return RewardResult(per_func, total, errors)


async def _await(x):
    return await x


def _validate(values, n: int, name: str) -> list[float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"must return a list of {n} rewards, got {got}")
    out = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"returned a non-finite or non-numeric reward {v!r}")
        else:
            out.append(float(v))
    return out
