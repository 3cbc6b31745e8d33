"""A synthetic SFT corpus for the bundled demo: 2048 strategies of widely varying quality.

    python -m ossrl.envs.game2048_corpus 20000 runs/demo/corpus.jsonl [--seed 0]
    plan = sample_plan(random.Random(0)); plan.family, plan.analysis, plan.code

Each conversation is the real 2048 task prompt (`tasks.prompt_2048`) and an assistant turn
drawn from a small grammar: an analysis (one or two sentences stating the plan) and a final
answer with one fenced `def strategy(board):`. The families, roughly worst to best:

    constant     always the same move (or an invalid string: "w", "up")      strategy ~ -1.5..2.5
    cycle        moves in a fixed cycle, no check that they change anything  ~ 2..8
    random       a random move from a subset of WASD                         ~ 3..9.5
    priority     the first move of an order that changes the board           ~ 8..10.5
    greedy       one-move lookahead scored by empty cells / merges /
                 a corner / monotone rows, a chosen order breaking ties       ~ 9..11.5

plus plausible mistakes inside the families (a priority loop that returns the first move that
changes *nothing*, a greedy that minimises, a lookahead that forgets to skip moves that do
nothing, a corner term for the wrong corner). `measure_corpus_quality` plays sampled plans with
`evaluate_strategy` so the spread is measured, not assumed (docs/demo.md has the figures).

The one thing to know: the analysis names the plan before any code, so which kind of strategy
a completion becomes is decided by its first few dozen tokens. That is what gives GRPO a handle
on a tiny model: rewards differ within a group, and raising the probability of the analysis that
announced a good plan raises the reward of everything that follows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
from pathlib import Path

from ossrl.envs.tasks import prompt_2048

NAMES = {"W": "up", "A": "left", "S": "down", "D": "right"}
# The corner each pair of preferred moves pushes the big tiles into, as a board index.
CORNERS = {frozenset("WA"): ("0", "0", "top-left"), frozenset("WD"): ("0", "-1", "top-right"),
           frozenset("SA"): ("-1", "0", "bottom-left"), frozenset("SD"): ("-1", "-1", "bottom-right")}

# One copy of the slide/merge helper, always spelled the same, so the model learns it by heart.
MOVE_HELPER = '''def move(board, d):
    rows = [list(r) for r in board]
    if d in "WS":
        rows = [list(c) for c in zip(*rows)]
    out = []
    for r in rows:
        if d in "SD":
            r = r[::-1]
        tiles = [v for v in r if v]
        merged = []
        while tiles:
            if len(tiles) > 1 and tiles[0] == tiles[1]:
                merged.append(2 * tiles[0])
                tiles = tiles[2:]
            else:
                merged.append(tiles.pop(0))
        merged += [0] * (len(r) - len(merged))
        if d in "SD":
            merged = merged[::-1]
        out.append(merged)
    if d in "WS":
        out = [list(c) for c in zip(*out)]
    return out
'''


@dataclasses.dataclass
class Plan:
    family: str        # constant | cycle | random | priority | greedy
    mistake: str       # "" or what is wrong with the code
    analysis: str
    code: str

    def conversation(self, user_message: str | None = None) -> dict:
        return {"messages": [
            {"role": "user", "content": user_message or prompt_2048()},
            {"role": "assistant", "thinking": self.analysis,
             "content": f"```python\n{self.code}```"}]}


def _order(rng: random.Random, k: int = 4) -> str:
    """A move order; half the time one that starts with two moves of one corner."""
    if rng.random() < 0.5:
        first = rng.choice(sorted("".join(sorted(c)) for c in CORNERS))
        first = first if rng.random() < 0.5 else first[::-1]
        rest = [m for m in "WASD" if m not in first]
        rng.shuffle(rest)
        order = first + "".join(rest)
    else:
        order = "".join(rng.sample("WASD", 4))
    return order[:k]


def _words(order: str) -> str:
    return ", ".join(NAMES[m] for m in order)


def _constant(rng):
    m = rng.choice("WASD")
    answer, mistake = f'"{m}"', ""
    if rng.random() < 0.3:  # a plausible wrong spelling of the move
        answer, mistake = rng.choice([f'"{m.lower()}"', f'"{NAMES[m]}"']), "invalid_answer"
    analysis = rng.choice([f"Keep it simple: always move {NAMES[m]}.",
                           f"Always press {m} ({NAMES[m]}); the tiles pile up on one side."])
    return Plan("constant", mistake, analysis, f"def strategy(board):\n    return {answer}\n")


def _cycle(rng):
    order = "".join(rng.sample("WASD", rng.choice([2, 3, 4])))
    analysis = f"Cycle through the moves {_words(order)}, one per turn, so the board keeps moving."
    code = (f"turn = [0]\n\n\ndef strategy(board):\n    turn[0] += 1\n"
            f"    return \"{order}\"[turn[0] % {len(order)}]\n")
    return Plan("cycle", "", analysis, code)


def _random(rng):
    moves = "WASD" if rng.random() < 0.5 else "".join(sorted(rng.sample("WASD", rng.choice([2, 3])),
                                                            key="WASD".index))
    analysis = (f"Play a random move from {_words(moves)}; random play is hard to get stuck."
                if len(moves) == 4 else f"Play a random move, only {_words(moves)}, to keep tiles together.")
    code = f"import random\n\n\ndef strategy(board):\n    return random.choice(\"{moves}\")\n"
    return Plan("random", "", analysis, code)


def _priority(rng):
    order = _order(rng)
    mistake = "returns_blocked_move" if rng.random() < 0.25 else ""
    analysis = (f"Prefer {_words(order[:2])}, then {_words(order[2:])}: play the first move in the "
                f"order {order} that changes the board.")
    test = "==" if mistake else "!="
    code = (f"{MOVE_HELPER}\n\ndef strategy(board):\n    for d in \"{order}\":\n"
            f"        if move(board, d) {test} board:\n            return d\n    return \"{order[0]}\"\n")
    return Plan("priority", mistake, analysis, code)


def _greedy(rng):
    order = _order(rng)
    terms, said = [], []
    weight = rng.choice([1, 2, 10])
    if rng.random() < 0.8:
        terms.append(f"{weight} * sum(v == 0 for r in b for v in r)")
        said.append("empty cells")
    if rng.random() < 0.5:
        terms.append("sum(v * v for r in b for v in r) / 64")
        said.append("merges")
    mistake = ""
    if rng.random() < 0.6:
        pair = frozenset(order[:2])
        if pair not in CORNERS or rng.random() < 0.2:
            pair, mistake = rng.choice(sorted(CORNERS, key=sorted)), ("wrong_corner" if pair in CORNERS else "")
        r, c, name = CORNERS[pair]
        terms.append(f"{rng.choice([20, 50, 100])} * (b[{r}][{c}] == max(max(r) for r in b))")
        said.append(f"the largest tile in the {name} corner")
    if rng.random() < 0.35:
        terms.append("sum(min(x, y) for r in b for x, y in zip(r, r[1:]))"
                     " + sum(min(x, y) for r in zip(*b) for x, y in zip(r, r[1:])) / 4")
        said.append("neighbours of equal size")
    if not terms:
        terms.append(f"{weight} * sum(v == 0 for r in b for v in r)")
        said.append("empty cells")
    if rng.random() < 0.15:
        mistake = "minimises"
    elif rng.random() < 0.15:
        mistake = "keeps_blocked_moves"
    analysis = (f"Look one move ahead: try {_words(order)}, score each resulting board by "
                f"{' and '.join(said)}, and play the best.")
    score = "\n        + ".join(terms)
    better = "<" if mistake == "minimises" else ">"
    skip = "" if mistake == "keeps_blocked_moves" else "        if after == board:\n            continue\n"
    code = (f"{MOVE_HELPER}\n\ndef score(b):\n    return ({score})\n\n\n"
            f"def strategy(board):\n    best, best_d = None, \"{order[0]}\"\n"
            f"    for d in \"{order}\":\n        after = move(board, d)\n{skip}"
            f"        s = score(after)\n        if best is None or s {better} best:\n"
            f"            best, best_d = s, d\n    return best_d\n")
    return Plan("greedy", mistake, analysis, code)


FAMILIES = {"constant": _constant, "cycle": _cycle, "random": _random, "priority": _priority, "greedy": _greedy}
# The mix the SFT model imitates: more mediocre than good, so GRPO has somewhere to go.
DEFAULT_WEIGHTS = {"constant": 0.2, "cycle": 0.15, "random": 0.2, "priority": 0.25, "greedy": 0.2}
POOL_SIZE = 32  # distinct plans in the corpus


def sample_plan(rng: random.Random, weights: dict[str, float] | None = None) -> Plan:
    weights = weights or DEFAULT_WEIGHTS
    family = rng.choices(list(weights), weights=list(weights.values()))[0]
    return FAMILIES[family](rng)


def plan_pool(size: int = POOL_SIZE, *, seed: int = 0) -> list[Plan]:
    """`size` distinct plans drawn from the grammar: the strategies the corpus is made of."""
    rng, pool, seen = random.Random(seed), [], set()
    while len(pool) < size:
        plan = sample_plan(rng)
        if plan.code not in seen:
            seen.add(plan.code)
            pool.append(plan)
    return pool


def make_corpus(num: int, *, seed: int = 0, pool_seed: int | None = None) -> list[dict]:
    """`num` conversations ({"messages": [...], "family": ..., "mistake": ...}): fresh draws
    from the grammar, or with `pool_seed`, draws from the plans of `plan_pool(seed=pool_seed)`
    (uniformly; the pool holds the families in the proportions of DEFAULT_WEIGHTS). A finite
    pool keeps the choices the model makes few and early (which plan), so what GRPO must move
    is the plan, not every token of the code (docs/demo.md: why the demo model needs this)."""
    rng = random.Random(seed)
    pool = plan_pool(seed=pool_seed) if pool_seed is not None else None
    rows = []
    for _ in range(num):
        plan = rng.choice(pool) if pool else sample_plan(rng)
        rows.append({**plan.conversation(), "family": plan.family, "mistake": plan.mistake})
    return rows


def measure_corpus_quality(num: int | None = None, *, seed: int = 0, games: int = 4) -> dict:
    """Play the plan pool (or `num` freshly sampled plans; `games` games each, board seed 0)
    and summarise the `strategy_succeeds` reward by family; returns {"all": [...], family: [...]}."""
    from ossrl.envs.rewards import strategy_reward
    from ossrl.envs.strategy import evaluate_strategy

    rng = random.Random(seed)
    plans = plan_pool(seed=seed) if num is None else [sample_plan(rng) for _ in range(num)]
    scores: dict[str, list[float]] = {"all": []}
    for plan in plans:
        reward = strategy_reward(evaluate_strategy(plan.code, games=games, seed=0))
        key = plan.family + (f"/{plan.mistake}" if plan.mistake else "")
        for k in dict.fromkeys(("all", plan.family, key)):
            scores.setdefault(k, []).append(reward)
    return scores


def summarise(scores: dict[str, list[float]]) -> str:
    lines = [f"{'family':<32} {'n':>5} {'mean':>6} {'min':>6} {'max':>6}"]
    for key in sorted(scores, key=lambda k: (k != "all", k)):
        v = scores[key]
        lines.append(f"{key:<32} {len(v):>5} {statistics.fmean(v):>6.2f} {min(v):>6.2f} {max(v):>6.2f}")
    return "\n".join(lines)


def largest_tile(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """Not a reward but a metric in reward form (give it weight 0): the mean largest tile each
    completion's strategy reached over its games, 0 when it did not load. Shares the cached
    evaluations of the 2048 rewards, so it costs nothing extra."""
    from ossrl.envs.rewards import strategy_results

    return [float(r.mean_max_tile) if r.loaded else 0.0 for r in strategy_results(list(completions or []), **columns)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("num", type=int)
    parser.add_argument("out", nargs="?", help="JSONL to write (omit with --measure)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", action="store_true",
                        help="play the plan pool (NUM=0) or NUM sampled plans and print the spread")
    args = parser.parse_args(argv)
    if args.measure:
        print(summarise(measure_corpus_quality(args.num or None, seed=args.seed)))
        return
    rows = make_corpus(args.num, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} conversations to {args.out}")


if __name__ == "__main__":
    main()
