"""`ossrl plot RUN_DIR`: PNG curves of a run's metrics.jsonl (matplotlib, no display needed).

Writes RUN_DIR/plots/<group>.png for the reward (overall and per function), the held-out
evaluation's, completion lengths, loss/KL/entropy, clip and importance ratios, and
timings/throughput. Missing metrics are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = {
    "rewards": ["reward", "rewards/*/mean"],
    "eval": ["eval/reward", "eval/rewards/*/mean", "eval/completions/mean_length"],
    "lengths": ["completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio"],
    "loss": ["loss", "kl", "entropy", "grad_norm"],
    "ratios": ["clip_ratio/low_mean", "clip_ratio/high_mean", "importance_ratio/mean", "frac_reward_zero_std"],
    "speed": ["time/generate", "time/reward", "time/train", "tokens_per_second"],
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: list[dict], pattern: str) -> dict[str, tuple[list, list]]:
    keys = sorted({k for r in records for k in r})
    if "*" in pattern:
        head, tail = pattern.split("*")
        keys = [k for k in keys if k.startswith(head) and k.endswith(tail)]
    else:
        keys = [pattern] if pattern in keys else []
    out = {}
    for k in keys:
        xs = [r["step"] for r in records if isinstance(r.get(k), (int, float))]
        ys = [r[k] for r in records if isinstance(r.get(k), (int, float))]
        if xs:
            out[k] = (xs, ys)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, patterns in PANELS.items():
        series = {}
        for p in patterns:
            series.update(_series(records, p))
        if not series:
            continue
        fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.2 * len(series)), sharex=True, squeeze=False)
        for ax, (key, (xs, ys)) in zip(axes[:, 0], series.items()):
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{run_dir.name}: {name}")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
