"""`ossrl play2048 strategy.py`: watch a strategy play 2048 in the terminal.

    ossrl play2048 strategy.py [--games 1] [--seed 0] [--delay 0.05] [--no-animate]
    ossrl play2048 completion.txt                  # a model's answer: the code is extracted
    ossrl play2048 runs/2048/samples.jsonl         # the best-rewarded sample of the last step

The strategy runs exactly as in training: in a sandbox worker, one call per move, with a copy
of the board, through `strategy.play_game`. `--no-animate` prints only each game's last board
and summary (for tests and logs). Exit status 0 when the strategy ran, 1 when it could not be
loaded or failed, 2 for a bad file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ossrl.envs.code import extract_python_function, static_problem
from ossrl.envs.game2048 import MOVE_NAMES, Game2048, render_board
from ossrl.envs.pool import ENV_POLICY
from ossrl.envs.strategy import game_seed, play_game
from ossrl.sandbox import Sandbox, SandboxException

_CLEAR = "\x1b[H\x1b[2J"


def _best_sample(path: Path) -> str:
    """The completion with the highest reward in the last step of a run's samples.jsonl."""
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not samples:
        raise ValueError(f"{path}: no samples")
    last = max(s.get("step", 0) for s in samples)
    best = max((s for s in samples if s.get("step", 0) == last), key=lambda s: s.get("reward", float("-inf")))
    return best.get("completion", "")


def load_strategy_source(path: str) -> str:
    """Source from a .py file, a completion text, or a samples.jsonl (see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = _best_sample(file) if file.suffix == ".jsonl" else file.read_text()
    if file.suffix == ".py" and "def strategy" in text:
        return text
    source = extract_python_function(text, "strategy")
    if source is None:
        raise ValueError(f"{path}: no `def strategy(board)` found")
    return source


def play_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ossrl play2048", description="Watch a 2048 strategy play.")
    parser.add_argument("strategy", help="a .py file defining strategy(board), a completion, or samples.jsonl")
    parser.add_argument("--games", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--target", type=int, default=2048)
    parser.add_argument("--max-moves", type=int, default=5000)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between frames")
    parser.add_argument("--move-timeout", type=float, default=1.0, help="seconds per move")
    parser.add_argument("--no-animate", action="store_true", help="print only final boards")
    parser.add_argument("--no-color", action="store_true")
    args = parser.parse_args(argv)
    try:
        source = load_strategy_source(args.strategy)
    except (OSError, ValueError) as exc:
        print(f"ossrl play2048: error: {exc}", file=sys.stderr)
        return 2
    problem = static_problem(source, ENV_POLICY)
    if problem is not None:
        print(f"ossrl play2048: the strategy cannot run ({problem[0]}): {problem[1]}", file=sys.stderr)
        return 1
    color = not args.no_color and sys.stdout.isatty()

    def show(game: Game2048, answer, header: str) -> None:
        move = MOVE_NAMES.get(answer, f"invalid answer {answer!r:.40}") if isinstance(answer, str) else (
            f"invalid answer {answer!r:.40}" if answer is not None else "")
        print(f"{_CLEAR}{header}  score {game.score}  max tile {game.max_tile}  moves {game.moves}  {move}")
        print(render_board(game.board, color=color), flush=True)
        time.sleep(args.delay)

    status = 0
    with Sandbox(ENV_POLICY, prestart=0) as sandbox:
        try:
            function = sandbox.open(source, "strategy")
        except SandboxException as exc:
            print(f"ossrl play2048: the strategy failed to load ({exc.category}): {exc}", file=sys.stderr)
            return 1
        with function:
            for g in range(args.games):
                header = f"game {g + 1}/{args.games} (seed {args.seed})"
                game = Game2048(args.size, args.target, seed=game_seed(args.seed, g))
                on_move = None if args.no_animate else (lambda gm, answer, h=header: show(gm, answer, h))
                if on_move is not None:
                    show(game, None, header)
                record, failure = play_game(function, game, max_moves=args.max_moves,
                                            move_timeout_s=args.move_timeout, game_timeout_s=float("inf"),
                                            on_move=on_move)
                if args.no_animate:
                    print(render_board(game.board, color=color))
                print(f"{header}: {record.end}, score {record.score}, max tile {record.max_tile}, "
                      f"{record.moves} moves, {record.invalid_moves} invalid answers")
                if failure is not None:
                    print(f"  stopped by {failure.category}: {failure}", file=sys.stderr)
                    status = 1
                    if not function.alive:
                        break
    return status


if __name__ == "__main__":
    sys.exit(play_main(sys.argv[1:]))
