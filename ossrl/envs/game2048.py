"""2048 in pure Python: the rules (`apply_move`), a seeded game (`Game2048`), a terminal renderer.

What it is: the trusted half of the 2048 environment. The harness in `strategy.py` owns a
`Game2048` and only ever hands a candidate strategy a *copy* of its board, so nothing the
strategy does to what it receives can change the game. What it is not: a strategy, or anything
that runs untrusted code.

The one thing to know: a board is a tuple of tuples of ints, row-major, 0 for an empty cell,
and moves are the keys "W" (up), "A" (left), "S" (down), "D" (right). Merges follow the
standard rules: tiles slide towards the move direction, each tile merges at most once per
move, and the pair nearest the wall merges first ([2, 2, 2, 0] left -> [4, 2, 0, 0]).

    game = Game2048(seed=0)
    while game.state == "ongoing":
        game.move(my_choice(game.board))
    print(render_board(game.board), game.score, game.max_tile)
"""

from __future__ import annotations

import random

Board = tuple[tuple[int, ...], ...]
MOVES = ("W", "A", "S", "D")
MOVE_NAMES = {"W": "up", "A": "left", "S": "down", "D": "right"}


def empty_board(size: int = 4) -> Board:
    return tuple((0,) * size for _ in range(size))


def _merge_line(line) -> tuple[tuple[int, ...], int]:
    """Slide and merge one row towards index 0: ([2, 2, 2, 2]) -> ((4, 4, 0, 0), 8)."""
    tiles = [v for v in line if v]
    out, points, i = [], 0, 0
    while i < len(tiles):
        if i + 1 < len(tiles) and tiles[i] == tiles[i + 1]:
            merged = 2 * tiles[i]
            out.append(merged)
            points += merged
            i += 2
        else:
            out.append(tiles[i])
            i += 1
    return tuple(out) + (0,) * (len(line) - len(out)), points


def _transpose(board) -> Board:
    return tuple(zip(*board))


def apply_move(board, direction: str) -> tuple[Board, int]:
    """(new board, points scored) after moving `board` in `direction`. Pure: no tile spawns.

    Points are the sum of the tiles created by merges. The new board equals the old one when
    the move changes nothing (then it is not a legal move)."""
    if direction not in MOVES:
        raise ValueError(f"direction must be one of {MOVES}, got {direction!r}")
    rows = tuple(tuple(r) for r in board)
    if direction in ("W", "S"):
        rows = _transpose(rows)
    reverse = direction in ("S", "D")  # merge towards the end of each line
    merged, points = [], 0
    for row in rows:
        line, p = _merge_line(row[::-1] if reverse else row)
        merged.append(line[::-1] if reverse else line)
        points += p
    new = tuple(merged)
    if direction in ("W", "S"):
        new = _transpose(new)
    return new, points


def can_move(board) -> bool:
    """Whether any move changes the board: an empty cell or two equal neighbours."""
    size = len(board)
    for r in range(size):
        for c in range(size):
            v = board[r][c]
            if v == 0 or (c + 1 < size and board[r][c + 1] == v) or (r + 1 < size and board[r + 1][c] == v):
                return True
    return False


def legal_moves(board) -> list[str]:
    return [d for d in MOVES if apply_move(board, d)[0] != tuple(map(tuple, board))]


class Game2048:
    """One game: the board, the score, and a seeded random source for spawns.

    `board` is a fresh tuple of tuples each time it is read. A move that changes nothing
    spawns nothing and returns False. `state` is "won" once a tile reaches `target`,
    "lost" when no move changes the board, else "ongoing"; moves stay allowed after a win.
    `board` starts from a given position (no initial spawns) instead of two spawned tiles.
    """

    def __init__(self, size: int = 4, target: int = 2048, p_four: float = 0.1, seed=None, *, board=None):
        if size < 2:
            raise ValueError(f"size must be at least 2, got {size}")
        if not 0.0 <= p_four <= 1.0:
            raise ValueError(f"p_four must be in [0, 1], got {p_four}")
        self.size, self.target, self.p_four = size, target, p_four
        self._rng = random.Random(seed)
        self.score = 0
        self.moves = 0  # moves that changed the board
        if board is not None:
            if len(board) != size or any(len(row) != size for row in board):
                raise ValueError(f"board must be {size} x {size}")
            self._cells = [list(row) for row in board]
        else:
            self._cells = [[0] * size for _ in range(size)]
            self.spawn()
            self.spawn()

    @property
    def board(self) -> Board:
        return tuple(tuple(row) for row in self._cells)

    @property
    def max_tile(self) -> int:
        return max(max(row) for row in self._cells)

    @property
    def state(self) -> str:
        if self.max_tile >= self.target:
            return "won"
        return "ongoing" if can_move(self._cells) else "lost"

    def spawn(self) -> tuple[int, int, int] | None:
        """Put a 2 (or a 4 with probability p_four) on a uniformly random empty cell."""
        empty = [(r, c) for r in range(self.size) for c in range(self.size) if self._cells[r][c] == 0]
        if not empty:
            return None
        r, c = empty[self._rng.randrange(len(empty))]
        value = 4 if self._rng.random() < self.p_four else 2
        self._cells[r][c] = value
        return r, c, value

    def move(self, direction: str) -> bool:
        new, points = apply_move(self._cells, direction)
        if new == self.board:
            return False
        self._cells = [list(row) for row in new]
        self.score += points
        self.moves += 1
        self.spawn()
        return True


# ---------------------------------------------------------------- terminal rendering
_COLORS = {0: 250, 2: 255, 4: 230, 8: 216, 16: 209, 32: 203, 64: 196, 128: 228, 256: 227,
           512: 226, 1024: 220, 2048: 214}


def render_board(board, *, color: bool = False) -> str:
    """The board as a text grid; `color` adds ANSI 256-colour backgrounds per tile value."""
    width = max(4, len(str(max(max(r) for r in board))))
    line = "+" + "+".join("-" * (width + 2) for _ in board[0]) + "+"
    out = [line]
    for row in board:
        cells = []
        for v in row:
            text = f" {(str(v) if v else '.'):^{width}} "
            if color:
                text = f"\x1b[48;5;{_COLORS.get(v, 208)}m\x1b[38;5;16m{text}\x1b[0m"
            cells.append(text)
        out += ["|" + "|".join(cells) + "|", line]
    return "\n".join(out)
