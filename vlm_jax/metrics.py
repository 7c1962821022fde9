"""Run outputs: metrics.jsonl, TensorBoard events and PNG plots (written by process 0 only)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` lines to ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "metrics.jsonl"
            if path.exists() and path.stat().st_size:
                with open(path, "rb+") as f:  # A line cut short by a kill or a full disk:
                    f.seek(-1, 2)            # end it, so the next record starts on its own.
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            if tensorboard:
                from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes scalar metrics for ``step``."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        with open(self.workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """All records of ``workdir/metrics.jsonl`` (empty list if absent)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # A line cut short by a kill or a full disk.
            continue
    return records


def plot_metrics(workdir: str | pathlib.Path, filename: str = "metrics.png") -> pathlib.Path | None:
    """Draws training loss, learning rate, temperature and eval curves into one PNG."""
    records = read_metrics(workdir)
    if not records or jax.process_index() != 0:
        return None
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    def series(key):
        pts = [(r["step"], r[key]) for r in records if key in r]
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else None

    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    panels = [("train/loss", "training loss"), ("train/lr", "learning rate"),
              ("train/logit_scale", "logit scale (1/temperature)")]
    panels = [(k, t) for k, t in panels if series(k) is not None]
    n = len(panels) + (1 if eval_keys else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        x, y = series(key)
        ax.plot(x, y, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if eval_keys:
        ax = axes[0][-1]
        for key in eval_keys:
            x, y = series(key)
            ax.plot(x, y, marker="o", ms=3, label=key.removeprefix("eval/"))
        ax.set_title("evaluation")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    out = pathlib.Path(workdir) / filename
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
