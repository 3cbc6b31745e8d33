"""Task prompts and datasets for the environments.

    rows = make_2048_dataset(64, seed=0)        # [{"prompt": <user message>, "seed": int}, ...]
    write_jsonl(rows, "examples/2048-prompts.jsonl")
    print(render_task_prompt(prompt_2048(), reasoning_effort="low"))   # the harmony text

The one thing to know: a row's "prompt" is the *user message*; the trainer renders the harmony
prompt itself, with GRPOConfig.reasoning_effort in the system message. A row's "seed" reaches
the reward functions as a column, and all `num_generations` completions of one prompt share the
row, so a group plays the same boards (or gets the same matrices): the group's rewards differ
only through the strategies. Regenerate the shipped JSONL with
`python -m ossrl.envs.tasks 2048 64 examples/2048-prompts.jsonl`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from ossrl.sandbox import DEFAULT_ALLOWED_MODULES

_ALLOWED = ", ".join(m for m in sorted(DEFAULT_ALLOWED_MODULES) if "." not in m)

PROMPT_2048 = f"""Write a Python function `strategy(board)` that plays the game 2048.

`board` is a list of {{size}} lists of {{size}} ints, row by row from the top; 0 is an empty cell. \
Return exactly one of the strings "W" (up), "A" (left), "S" (down), "D" (right). Tiles slide \
in that direction and equal tiles merge; after each move a 2 or a 4 appears on an empty cell. \
The goal is a {{target}} tile. A move that changes nothing, or any other return value, wastes a \
turn, and several wasted turns in a row end the game.

Your function is called once per move, with a fresh copy of the board, and has \
{{move_ms}} ms per move. Only the standard library modules {_ALLOWED} may be imported; no \
numpy, files, network or subprocesses. Answer with one ```python code block that defines \
`strategy` (helper functions are fine) and nothing else."""

PROMPT_MATMUL = f"""Write a fast pure-Python function `matmul(A, B)` that multiplies two matrices.

`A` is a list of n lists of k floats and `B` a list of k lists of m floats (n, k, m >= 1; not \
necessarily square). Return C = A @ B as a list of n lists of m floats, accurate to float64 \
precision. It is timed against a plain triple loop on matrices up to 64 x 64.

Only the standard library modules {_ALLOWED} may be imported; no numpy, files, network or \
subprocesses. Answer with one ```python code block that defines `matmul` and nothing else."""


def prompt_2048(*, size: int = 4, target: int = 2048, move_ms: int = 250) -> str:
    """The user message of the 2048 task."""
    return PROMPT_2048.format(size=size, target=target, move_ms=move_ms)


def prompt_matmul() -> str:
    """The user message of the matrix-multiplication task."""
    return PROMPT_MATMUL


def render_task_prompt(user_message: str, *, reasoning_effort: str = "low") -> str:
    """The full harmony prompt text (system + user + `<|start|>assistant`), e.g. for
    `ossrl generate` or to read what the model sees."""
    from ossrl.model.chat import render_prompt_text

    return render_prompt_text(user_message, reasoning_effort=reasoning_effort)


def _rows(prompt: str, num_rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt, "seed": rng.randrange(2 ** 31)} for _ in range(num_rows)]


def make_2048_dataset(num_rows: int, *, seed: int = 0, size: int = 4, target: int = 2048) -> list[dict]:
    """`num_rows` rows of the 2048 task, each with its own board seed."""
    rows = _rows(prompt_2048(size=size, target=target), num_rows, seed)
    if size != 4 or target != 2048:
        for row in rows:
            row.update(board_size=size, target=target)
    return rows


def make_matmul_dataset(num_rows: int, *, seed: int = 0) -> list[dict]:
    """`num_rows` rows of the matmul task, each with its own matrix seed."""
    return _rows(prompt_matmul(), num_rows, seed)


def write_jsonl(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


DATASETS = {"2048": make_2048_dataset, "matmul": make_matmul_dataset}

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in DATASETS:
        sys.exit("usage: python -m ossrl.envs.tasks {2048|matmul} NUM_ROWS OUT.jsonl")
    print(write_jsonl(DATASETS[sys.argv[1]](int(sys.argv[2])), sys.argv[3]))
