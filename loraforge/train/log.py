"""What a run records as it goes: metrics.jsonl (strict JSON), TensorBoard (or nothing), the learning curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

from loraforge.atomic import write_text


class NoWriter:
    """TensorBoard switched off: the same calls, doing nothing."""

    def add_scalar(self, key: str, value: float, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


class MetricsLog:
    """metrics.jsonl, one JSON object per line (a non-finite value is written as null: strict readers reject NaN),
    and the same scalars to TensorBoard. On resume, rows past the checkpoint's step are dropped first. `path`
    None: log nothing (the ranks other than 0 of a distributed run)."""

    def __init__(self, path: Path | None, tensorboard: Path | None, resume_step: int | None) -> None:
        self.path = path
        if path is None:
            self.writer = NoWriter()
            return
        if resume_step is None:
            write_text(path, "")
        else:
            kept = [row for row in self.rows() if row["step"] <= resume_step]
            write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
        if tensorboard is None:
            self.writer = NoWriter()
        else:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard), purge_step=resume_step)

    def log(self, step: int, **values: float | None) -> None:
        if self.path is None:
            return
        row = {"step": step, **{key: _finite_or_none(value) for key, value in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def rows(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self.writer.close()


def plot_learning_curve(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    from loraforge.report import learning_curve_figure

    fig = learning_curve_figure(rows)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
