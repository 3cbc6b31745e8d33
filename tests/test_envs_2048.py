"""2048: the rules, the seeded game, and the harness that plays model-written strategies."""

import itertools
import time

import pytest

from ossrl.envs.game2048 import Game2048, apply_move, can_move, empty_board, legal_moves, render_board
from ossrl.envs.play import play_main
from ossrl.envs.strategy import (ALWAYS_W_STRATEGY, CORNER_STRATEGY, RANDOM_STRATEGY, evaluate_strategy,
                                 game_seed)

# (row, row after moving left, points, row after moving right, points), all by hand.
ROWS = [
    ((2, 2, 2, 2), (4, 4, 0, 0), 8, (0, 0, 4, 4), 8),
    ((4, 0, 4, 8), (8, 8, 0, 0), 8, (0, 0, 8, 8), 8),
    ((2, 2, 4, 4), (4, 8, 0, 0), 12, (0, 0, 4, 8), 12),
    ((2, 2, 2, 0), (4, 2, 0, 0), 4, (0, 0, 2, 4), 4),
    ((0, 2, 2, 2), (4, 2, 0, 0), 4, (0, 0, 2, 4), 4),
    ((4, 4, 8, 0), (8, 8, 0, 0), 8, (0, 0, 8, 8), 8),   # a merged 8 does not merge again
    ((8, 0, 0, 8), (16, 0, 0, 0), 16, (0, 0, 0, 16), 16),
    ((2, 0, 2, 4), (4, 4, 0, 0), 4, (0, 0, 4, 4), 4),
    ((0, 0, 0, 2), (2, 0, 0, 0), 0, (0, 0, 0, 2), 0),
    ((2, 4, 2, 4), (2, 4, 2, 4), 0, (2, 4, 2, 4), 0),
    ((0, 0, 0, 0), (0, 0, 0, 0), 0, (0, 0, 0, 0), 0),
    ((1024, 1024, 2, 2), (2048, 4, 0, 0), 2052, (0, 0, 2048, 4), 2052),
]


def _with_row(row, index, vertical):
    """A 4x4 board holding `row` as row `index` (or as column `index`, top to bottom)."""
    cells = [[0] * 4 for _ in range(4)]
    for k, v in enumerate(row):
        if vertical:
            cells[k][index] = v
        else:
            cells[index][k] = v
    return tuple(map(tuple, cells))


@pytest.mark.parametrize("row,left,left_pts,right,right_pts", ROWS)
def test_apply_move_matches_hand_made_rows_in_every_direction_and_position(row, left, left_pts, right, right_pts):
    for index in range(4):
        horizontal = _with_row(row, index, vertical=False)
        assert apply_move(horizontal, "A") == (_with_row(left, index, False), left_pts)
        assert apply_move(horizontal, "D") == (_with_row(right, index, False), right_pts)
        vertical = _with_row(row, index, vertical=True)
        assert apply_move(vertical, "W") == (_with_row(left, index, True), left_pts)
        assert apply_move(vertical, "S") == (_with_row(right, index, True), right_pts)


def test_apply_move_on_a_full_board_moves_every_row_independently():
    board = tuple(row for row, *_ in ROWS[:4])
    new, points = apply_move(board, "A")
    assert new == tuple(left for _, left, *_ in ROWS[:4])
    assert points == sum(p for _, _, p, *_ in ROWS[:4])
    new, points = apply_move(board, "W")  # columns (2,4,2,2) (2,0,2,2) (2,4,4,2) (2,8,4,0)
    assert new == ((2, 4, 2, 2), (4, 2, 8, 8), (4, 0, 2, 4), (0, 0, 0, 0)) and points == 16


def test_apply_move_is_pure_and_refuses_unknown_directions():
    board = [[2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    apply_move(board, "A")
    assert board[0] == [2, 2, 0, 0]
    for bad in ("w", "up", "", None, "WA"):
        with pytest.raises(ValueError):
            apply_move(board, bad)


def test_can_move_and_legal_moves():
    stuck = ((2, 4, 2, 4), (4, 2, 4, 2), (2, 4, 2, 4), (4, 2, 4, 2))
    assert not can_move(stuck) and legal_moves(stuck) == []
    corner = ((2, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
    assert legal_moves(corner) == ["S", "D"]
    pair = ((2, 4, 2, 4), (4, 2, 4, 2), (2, 4, 2, 4), (4, 2, 8, 8))
    assert can_move(pair) and legal_moves(pair) == ["A", "D"]


def test_seeded_game_is_reproducible_and_seeds_differ():
    def play(seed):
        game = Game2048(seed=seed)
        history = [game.board]
        for move in itertools.islice(itertools.cycle("WASD"), 60):
            game.move(move)
            history.append(game.board)
        return history, game.score

    assert play(7) == play(7)
    assert play(7) != play(8)
    assert play(game_seed(0, 1)) == play(game_seed(0, 1))


def test_move_that_changes_nothing_spawns_nothing_and_a_real_move_spawns_once():
    start = ((2, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0))
    game = Game2048(seed=0, board=start)
    assert game.move("W") is False and game.move("A") is False
    assert game.board == start and game.moves == 0
    assert game.move("D") is True
    tiles = sorted(v for row in game.board for v in row if v)
    assert len(tiles) == 2 and game.board[0][3] == 2 and tiles[0] in (2, 4)
    assert isinstance(game.board, tuple) and all(isinstance(r, tuple) for r in game.board)
    assert game.board is not game.board  # a fresh tuple each read


def test_spawn_distribution_is_uniform_over_empty_cells_with_p_four():
    n = 16000
    game = Game2048(seed=123, board=empty_board())
    counts, fours = [0] * 16, 0
    for _ in range(n):
        game._cells = [[0] * 4 for _ in range(4)]
        r, c, value = game.spawn()
        counts[4 * r + c] += 1
        fours += value == 4
    # 4.5 standard deviations: fails by chance about once in 150,000 runs.
    assert abs(fours / n - 0.1) < 4.5 * (0.1 * 0.9 / n) ** 0.5
    expected, sd = n / 16, (n * (1 / 16) * (15 / 16)) ** 0.5
    assert all(abs(c - expected) < 4.5 * sd for c in counts), counts
    # only empty cells receive tiles
    one_hole = [[2] * 4 for _ in range(4)]
    one_hole[2][1] = 0
    game = Game2048(seed=1, board=one_hole, p_four=1.0)
    assert game.spawn() == (2, 1, 4) and game.spawn() is None


def test_state_won_lost_ongoing():
    assert Game2048(size=2, target=8, board=((4, 4), (0, 0))).state == "ongoing"
    won = Game2048(size=2, target=8, seed=0, board=((4, 4), (0, 0)))
    assert won.move("A") and won.state == "won" and won.score == 8
    assert Game2048(size=2, board=((2, 4), (4, 2))).state == "lost"


def test_render_board_shows_tiles():
    text = render_board(((2, 0), (2048, 16)))
    assert "2048" in text and "16" in text and "." in text
    assert "\x1b[" in render_board(((2, 0), (0, 0)), color=True)


# ---------------------------------------------------------------- the harness
FAST = dict(games=4, seed=0, max_moves=300)


@pytest.fixture(scope="module")
def references():
    return {name: evaluate_strategy(src, **FAST) for name, src in
            [("random", RANDOM_STRATEGY), ("always_w", ALWAYS_W_STRATEGY), ("corner", CORNER_STRATEGY)]}


def test_reference_strategies_order_corner_over_random_over_always_w(references):
    corner, rand, always_w = references["corner"], references["random"], references["always_w"]
    for r in references.values():
        assert r.ok and r.error is None and r.games == 4 and r.invalid_moves == 0
    assert corner.mean_log2_max_tile > rand.mean_log2_max_tile + 0.5
    assert corner.mean_score > 1.5 * rand.mean_score
    assert rand.mean_log2_max_tile > always_w.mean_log2_max_tile + 2
    assert always_w.max_tile <= 16 and {r.end for r in always_w.records} == {"stuck"}
    assert all(r.calls <= 300 for r in corner.records)


def test_evaluation_is_reproducible_for_a_deterministic_strategy(references):
    again = evaluate_strategy(CORNER_STRATEGY, **FAST)
    assert again.records == references["corner"].records
    other = evaluate_strategy(CORNER_STRATEGY, **{**FAST, "seed": 1})
    assert other.records != again.records


def test_writing_a_2048_tile_into_the_board_changes_nothing():
    cheat = '''
def strategy(board):
    for row in board:
        for i in range(len(row)):
            row[i] = 2048
    board[0][0] = 2048
    return "W"
'''
    result = evaluate_strategy(cheat, **FAST)
    assert result.games_won == 0 and result.max_tile < 64
    assert result.records == evaluate_strategy(ALWAYS_W_STRATEGY, **FAST).records


@pytest.mark.parametrize("source,category", [
    ("def strategy(board):\n    while True:\n        pass\n", "timeout"),
    ("def strategy(board):\n    raise ValueError('nope')\n", "error"),
    ("def strategy(board):\n    return [0] * (10 ** 9)\n", "memory"),
    ("import os\ndef strategy(board):\n    return 'W'\n", "forbidden"),
    ("def strategy(board):\n    return getattr(board, '__class__')\n", "forbidden"),
    ("def strategy(board)\n    return 'W'\n", "syntax"),
    ("def other(board):\n    return 'W'\n", "load"),
    ("x = 1 / 0\ndef strategy(board):\n    return 'W'\n", "load"),
    (None, "no_code"),
])
def test_broken_strategies_are_reported_not_raised(source, category):
    start = time.monotonic()
    result = evaluate_strategy(source, games=2, max_moves=50)
    assert not result.ok and result.error[0] == category, result.error
    assert time.monotonic() - start < 5


def test_invalid_answers_are_counted_and_end_the_game_as_stuck():
    source = '''
CALLS = []
def strategy(board):
    CALLS.append(1)
    answers = [None, 3, "w", "up", {"move": "W"}, "W" * 1000, ["W"], 2.5]
    return answers[len(CALLS) % len(answers)]
'''
    result = evaluate_strategy(source, games=2, max_moves=100, max_stalled_moves=8)
    assert result.ok and result.invalid_moves == 16 and result.invalid_fraction == 1.0
    assert [r.end for r in result.records] == ["stuck", "stuck"] and result.moves == 0


def test_exception_ends_only_that_game_and_huge_output_is_capped():
    source = '''
N = []
def strategy(board):
    N.append(1)
    print("x" * 100000)
    if len(N) == 3:
        raise RuntimeError("bad luck")
    return "WASD"[len(N) % 4]
'''
    result = evaluate_strategy(source, games=3, max_moves=20)
    assert result.error[0] == "error" and "bad luck" in result.error[1]
    assert result.exceptions == 1 and result.games == 3
    assert [r.end for r in result.records][0] == "exception"
    assert result.records[1].calls == 20 and len(result.output) <= 16 << 10


def test_play_main_plays_and_reports(tmp_path, capsys):
    path = tmp_path / "strategy.py"
    path.write_text(CORNER_STRATEGY)
    assert play_main([str(path), "--no-animate", "--games", "2", "--seed", "3", "--max-moves", "50"]) == 0
    out = capsys.readouterr().out
    assert out.count("max tile") == 2 and "game 2/2" in out
    completion = tmp_path / "answer.txt"
    completion.write_text("<|channel|>final<|message|>Here:\n```python\n" + ALWAYS_W_STRATEGY + "```<|return|>")
    assert play_main([str(completion), "--no-animate"]) == 0
    assert "stuck" in capsys.readouterr().out
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\ndef strategy(board):\n    return 'W'\n")
    assert play_main([str(bad), "--no-animate"]) == 1
    assert play_main([str(tmp_path / "missing.py")]) == 2
