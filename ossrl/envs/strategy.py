"""Scoring a model-written 2048 strategy: the harness plays, the candidate only chooses moves.

    result = evaluate_strategy(source, games=8, seed=0)   # -> StrategyResult
    result.ok, result.error, result.mean_max_tile, result.games_won, result.invalid_moves, ...

The one thing to know: the harness owns the `Game2048`s. For every move it sends the
candidate's `strategy(board)` a *copy* of the board (a list of lists, through the sandbox, in a
separate process) and applies the answer itself, so writing a 2048 tile into the board the
strategy received changes nothing. The answer must be exactly "W", "A", "S" or "D"; anything
else (other strings, None, ints, huge values) is an invalid move: counted, and the board stays.

How a game ends: won (tile >= target), lost (no move changes the board), `max_moves` calls,
`max_stalled_moves` answers in a row that changed nothing ("stuck": a fixed "W" stops here
instead of looping until max_moves), the game's time budget, or an exception in the strategy
(the game ends, the next one starts). A timeout, memory error, crash or forbidden action stops
the whole evaluation: the worker is gone.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

from ossrl.envs.code import static_problem
from ossrl.envs.game2048 import MOVES, Game2048
from ossrl.sandbox import (RemoteFunction, Sandbox, SandboxBadReturn, SandboxError,
                           SandboxException)


@dataclasses.dataclass
class GameRecord:
    score: int
    max_tile: int
    moves: int          # answers that changed the board
    calls: int          # calls of strategy()
    invalid_moves: int  # answers that were not one of W/A/S/D
    end: str            # won | lost | max_moves | stuck | time_limit | exception | fatal


@dataclasses.dataclass
class StrategyResult:
    """What `evaluate_strategy` measured. `error` is (category, message) or None: categories
    no_code, syntax, too_large, forbidden, load (module body failed, no `strategy`), error (an
    exception during a move), timeout, memory, crash."""

    ok: bool = False
    error: tuple[str, str] | None = None
    loaded: bool = False
    games: int = 0
    games_won: int = 0
    mean_score: float = 0.0
    mean_max_tile: float = 0.0
    mean_log2_max_tile: float = 0.0
    mean_log2_score: float = 0.0  # mean of log2(1 + score)
    max_tile: int = 0
    invalid_moves: int = 0
    exceptions: int = 0
    moves: int = 0
    calls: int = 0
    records: list[GameRecord] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    strategy_cpu_s: float = 0.0   # the worker's CPU time, read from outside it
    mean_move_ms: float = 0.0     # wall time per strategy call, harness included
    output: str = ""              # what the strategy printed (capped)

    @property
    def fatal(self) -> bool:
        return self.error is not None and self.error[0] in ("timeout", "memory", "crash", "forbidden")

    @property
    def invalid_fraction(self) -> float:
        return self.invalid_moves / self.calls if self.calls else 0.0


def game_seed(seed: int, game: int) -> str:
    """The spawn seed of game `game` of an evaluation with `seed` (strings seed random.Random
    identically on every platform and Python version)."""
    return f"ossrl-2048:{seed}:{game}"


def play_game(strategy: Callable, game: Game2048, *, max_moves: int, move_timeout_s: float,
              game_timeout_s: float, max_stalled_moves: int = 8,
              on_move: Callable[[Game2048, object], None] | None = None) -> tuple[GameRecord, SandboxException | None]:
    """Play one game; `strategy` is a RemoteFunction (or any callable taking a board). Returns
    the record and the exception that ended it, if any (a SandboxError ends only this game;
    any other SandboxException means the worker is gone)."""
    start = time.perf_counter()
    calls = invalid = stalled = 0
    end, failure = None, None
    while end is None:
        if game.state != "ongoing":
            end = game.state
            break
        if calls >= max_moves:
            end = "max_moves"
            break
        if time.perf_counter() - start > game_timeout_s:
            end = "time_limit"
            break
        board = [list(row) for row in game.board]  # a copy; the game never sees it again
        calls += 1
        try:
            if isinstance(strategy, RemoteFunction):
                answer = strategy.call((board,), timeout=move_timeout_s)
            else:
                answer = strategy(board)
        except SandboxBadReturn:
            answer = None
        except SandboxError as exc:
            end, failure = "exception", exc
            break
        except SandboxException as exc:
            end, failure = "fatal", exc
            break
        changed = False
        if type(answer) is str and answer in MOVES:
            changed = game.move(answer)
        else:
            invalid += 1
        stalled = 0 if changed else stalled + 1
        if on_move is not None:
            on_move(game, answer)
        if stalled >= max_stalled_moves:
            end = "stuck"
    record = GameRecord(game.score, game.max_tile, game.moves, calls, invalid, end)
    return record, failure


def evaluate_strategy(source: str | None, *, games: int = 8, seed: int = 0, size: int = 4,
                      target: int = 2048, max_moves: int = 2000, move_timeout_s: float = 0.25,
                      game_timeout_s: float = 10.0, max_stalled_moves: int = 8, p_four: float = 0.1,
                      sandbox: Sandbox | None = None) -> StrategyResult:
    """Play `games` seeded games with the candidate's `strategy(board)`. Never raises on bad
    candidates: every failure is in `result.error`. Game i of seed s has the same spawns for
    every candidate (the boards differ only through the moves)."""
    from ossrl.envs.pool import shared_sandbox

    start = time.perf_counter()
    result = StrategyResult()
    sandbox = sandbox or shared_sandbox()
    problem = static_problem(source, sandbox.policy)
    if problem is not None:
        result.error = problem
        result.wall_s = time.perf_counter() - start
        return result
    try:
        function = sandbox.open(source, "strategy")
    except SandboxException as exc:
        category = "load" if exc.category in ("error", "bad_return") else exc.category
        result.error = (category, str(exc))
        result.wall_s = time.perf_counter() - start
        return result
    result.loaded = True
    with function:
        for g in range(games):
            game = Game2048(size, target, p_four, seed=game_seed(seed, g))
            record, failure = play_game(function, game, max_moves=max_moves, move_timeout_s=move_timeout_s,
                                        game_timeout_s=game_timeout_s, max_stalled_moves=max_stalled_moves)
            result.records.append(record)
            if failure is not None:
                if isinstance(failure, SandboxError):
                    result.exceptions += 1
                if result.error is None or record.end == "fatal":
                    result.error = (failure.category, str(failure))
                if record.end == "fatal":
                    break
        result.strategy_cpu_s = function.cpu_ns / 1e9
        result.output = function.output
    _summarise(result)
    result.wall_s = time.perf_counter() - start
    result.mean_move_ms = 1000 * result.wall_s / result.calls if result.calls else 0.0
    return result


def _summarise(result: StrategyResult) -> None:
    records = result.records
    result.ok = result.error is None
    result.games = len(records)
    if not records:
        return
    result.games_won = sum(r.end == "won" for r in records)
    result.mean_score = statistics.fmean(r.score for r in records)
    result.mean_max_tile = statistics.fmean(r.max_tile for r in records)
    result.mean_log2_max_tile = statistics.fmean(math.log2(r.max_tile) for r in records)
    result.mean_log2_score = statistics.fmean(math.log2(1 + r.score) for r in records)
    result.max_tile = max(r.max_tile for r in records)
    result.invalid_moves = sum(r.invalid_moves for r in records)
    result.moves = sum(r.moves for r in records)
    result.calls = sum(r.calls for r in records)


# ---------------------------------------------------------------- reference strategies
RANDOM_STRATEGY = '''
import random

_rng = random.Random(12345)  # seeded, so that the reference is reproducible

def strategy(board):
    return _rng.choice("WASD")
'''

ALWAYS_W_STRATEGY = '''
def strategy(board):
    return "W"
'''

# Greedy: the legal move that keeps most empty cells, rows and columns decreasing away from
# the top-left corner and the largest tile in that corner; down only when nothing else helps.
CORNER_STRATEGY = '''
def _slide(row):
    tiles = [v for v in row if v]
    out, i = [], 0
    while i < len(tiles):
        if i + 1 < len(tiles) and tiles[i] == tiles[i + 1]:
            out.append(2 * tiles[i])
            i += 2
        else:
            out.append(tiles[i])
            i += 1
    return out + [0] * (len(row) - len(out))

def _move(board, d):
    rows = [list(r) for r in board]
    if d in "WS":
        rows = [list(c) for c in zip(*rows)]
    if d in "SD":
        rows = [_slide(r[::-1])[::-1] for r in rows]
    else:
        rows = [_slide(r) for r in rows]
    if d in "WS":
        rows = [list(c) for c in zip(*rows)]
    return rows

def _value(board):
    n = len(board)
    empty = sum(v == 0 for row in board for v in row)
    # monotone: rows decreasing to the right, columns decreasing downwards
    mono = 0
    for r in range(n):
        for c in range(n - 1):
            mono -= max(0, board[r][c + 1] - board[r][c])
            mono -= max(0, board[c + 1][r] - board[c][r])
    corner = board[0][0] == max(max(row) for row in board)
    return 10 * empty + mono / 4 + 50 * corner

def strategy(board):
    current = [list(r) for r in board]
    best, best_move = None, "W"
    for d in "WADS":
        after = _move(board, d)
        if after == current:
            continue
        score = _value(after) - (100 if d == "S" else 0)
        if best is None or score > best:
            best, best_move = score, d
    return best_move
'''
