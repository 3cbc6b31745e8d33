"""Run logging: metrics.jsonl, samples.jsonl, a rich progress bar, and optional trackers.

Every step appends one JSON line of metrics and one line per completion to samples.jsonl (prompt,
completion, each reward), flushed at once so a killed run loses nothing logged. TensorBoard is
used when `report_to` names it and the package is installed; wandb/trackio likewise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunLogger:
    def __init__(self, output_dir: Path, *, report_to=(), progress_bar: bool = True, total_steps: int = 0,
                 start_step: int = 0, run_name: str | None = None, config: dict | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (self.dir / "metrics.jsonl").open("a")
        self.samples = (self.dir / "samples.jsonl").open("a")
        self.trackers = []
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.trackers.append(("tensorboard", SummaryWriter(str(self.dir / "tensorboard"))))
            except ImportError:
                print("report_to tensorboard: the tensorboard package is not installed; skipping")
        if "wandb" in report_to:
            import wandb

            self.trackers.append(("wandb", wandb.init(name=run_name, config=config, dir=str(self.dir))))
        if "trackio" in report_to:
            import trackio

            self.trackers.append(("trackio", trackio.init(project=run_name or "ossrl", config=config)))
        self.progress = None
        if progress_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log_step(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for kind, tracker in self.trackers:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if kind == "tensorboard":
                for k, v in scalars.items():
                    tracker.add_scalar(k, v, step)
                tracker.flush()
            else:
                tracker.log(scalars, step=step)
        if self.progress is not None:
            info = (f"reward {metrics.get('reward', float('nan')):.3f}  "
                    f"tok/s {metrics.get('tokens_per_second', 0):.0f}")
            self.progress.update(self.task, completed=step, info=info)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        for row in rows:
            self.samples.write(json.dumps({"step": step, **row}) + "\n")
        self.samples.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.metrics.close()
        self.samples.close()
        for kind, tracker in self.trackers:
            if kind == "tensorboard":
                tracker.close()
            elif hasattr(tracker, "finish"):
                tracker.finish()


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; None marks "not available"
    return v
