"""Print the fastest configuration of a `train.py --interleave` result as train.py flags.

    python benchmarks/pick_config.py results/train_ab.json [--tokens 4096]

The configuration with the lowest median step time at `--tokens` (default: the smallest token
count in the file), as its switches (`--fused-swiglu-backward --no-fused-lora-backward ...`), so
that one device call can A/B switches and then run the table on the winner. Prints it and nothing
else (stdout is read by the shell); the choice and every median go to stderr.
"""

import argparse
import json
import sys


def fastest(rows: list[dict], tokens: int | None) -> tuple[list[str], dict[tuple, float]]:
    if not rows:
        raise SystemExit("pick_config: the file has no rows")
    tokens = tokens if tokens is not None else min(r["tokens"] for r in rows)
    medians = {tuple(r["configuration"]): r["seconds"] for r in rows if r["tokens"] == tokens and "seconds" in r}
    if not medians:
        raise SystemExit(f"pick_config: no timed row at {tokens} tokens")
    best = min(medians, key=medians.get)
    return list(best), medians


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--tokens", type=int, default=None)
    args = ap.parse_args()
    with open(args.path) as f:
        rows = json.load(f)["rows"]
    best, medians = fastest(rows, args.tokens)
    for config, seconds in medians.items():
        print(f"{seconds:.4f} s  {','.join(config) or '(defaults)'}", file=sys.stderr)
    print(" ".join(f"--{switch}" for switch in best))


if __name__ == "__main__":
    main()
