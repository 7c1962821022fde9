"""Run outputs: metrics.jsonl, TensorBoard events and PNG plots (written by process 0 only).

Every file goes through ``etils.epath``, so a ``gs://`` workdir works like a local one (epath
uses gcsfs through fsspec for ``gs://`` when tensorflow is absent, ``tf.io.gfile`` when it is
installed). Cloud storage has no append: see :class:`MetricWriter` and :class:`_ObjectRecordWriter`
for how the two growing files are written there.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from vlm_jax.paths import PathLike, is_remote


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

    A local ``metrics.jsonl`` is appended to. An object in cloud storage cannot be appended to:
    the writer reads the existing object once (the lines of the runs before a resume are kept),
    holds the file's text and rewrites the whole object at every write. That keeps one file that
    users read the same way as a local one (per-flush part objects would not) and is safe against
    a kill: an object upload is atomic, so the object is always the previous or the new complete
    file. The cost is one upload of the file per log step: a few MB after 10^4 log steps, small
    against the seconds between log steps on an accelerator.
    """

    def __init__(self, workdir: PathLike, *, tensorboard: bool = True):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.remote = is_remote(self.workdir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._text: str | None = None  # Remote: the whole file, rewritten at each write.
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if self.remote:
                try:
                    self._text = self.path.read_text(encoding="utf-8")
                except FileNotFoundError:
                    self._text = ""
                if self._text and not self._text.endswith("\n"):
                    self._text += "\n"  # A line cut short: the next record starts on its own.
            elif self.path.exists() and self.path.stat().length:
                with open(self.path, "rb+") as f:  # A line cut short by a kill or a full disk:
                    f.seek(-1, 2)                  # end it, so the next record starts on its own.
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            if tensorboard:
                from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

                _register_tensorboard_object_writers()
                # Each writer lifetime (each start or resume) writes its own event file, named by
                # time and host; TensorBoard reads every event file of the directory in order.
                # The nanosecond suffix keeps a restart within the same second from replacing
                # the previous file (tensorboardX's name has whole seconds).
                self._tb = SummaryWriter(os.fspath(self.workdir / "tensorboard"),
                                         filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes scalar metrics for ``step``."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        line = json.dumps({"step": int(step), **scalars}) + "\n"
        if self.remote:
            self._text += line
            self.path.write_text(self._text, encoding="utf-8")
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard event file."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class _ObjectRecordWriter:
    """A TensorBoard event file in cloud storage, written through ``etils.epath``.

    tensorboardX writes ``gs://`` event files with google-cloud-storage, outside the path
    abstraction (and its credentials and endpoint settings) that every other file of a run goes
    through; this writer replaces it. Objects cannot be appended to, so the events are kept in
    memory and each flush rewrites the object (atomically: readers see the previous or the new
    complete file, and TensorBoard's reader, which resumes at its last offset, reads on since the
    new object starts with the old one). Past ``ROLL_BYTES`` the writer moves on to a new object
    ``<name>.<n>`` (zero-padded, so TensorBoard's sorted reading keeps the order), which bounds
    the bytes uploaded per flush however long the run.
    """

    ROLL_BYTES = 4 * 2**20

    def __init__(self, path: str):
        self.base, self.part = path, 0
        self.buffer = bytearray()
        self.closed = False

    @property
    def path(self) -> epath.Path:
        return epath.Path(self.base if self.part == 0 else f"{self.base}.{self.part:06d}")

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        if not self.buffer:
            return
        self.path.write_bytes(bytes(self.buffer))
        if len(self.buffer) >= self.ROLL_BYTES:
            self.part += 1
            self.buffer = bytearray()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _ObjectRecordWriterFactory:
    """tensorboardX's writer-factory interface (``open``, ``directory_check``) over epath."""

    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_tensorboard_object_writers() -> None:
    """Routes tensorboardX's ``gs://`` (and ``s3://``) event files through epath, with
    tensorboardX's own registry of writers by URL scheme."""
    from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

    for scheme in ("gs", "s3"):
        if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme),
                          _ObjectRecordWriterFactory):
            record_writer.register_writer_factory(scheme, _ObjectRecordWriterFactory())


def read_metrics(workdir: PathLike) -> list[dict]:
    """All records of ``workdir/metrics.jsonl`` (empty list if absent)."""
    try:
        text = (epath.Path(workdir) / "metrics.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # A line cut short by a kill or a full disk.
            continue
    return records


def plot_metrics(workdir: PathLike, filename: str = "metrics.png") -> epath.Path | None:
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
    out = epath.Path(workdir) / filename
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def save_figure(fig, path: PathLike, **kwargs) -> epath.Path:
    """Saves a matplotlib figure as PNG to ``path``, local or in cloud storage (matplotlib writes
    only local files: the PNG is rendered to memory and written through epath)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    path = epath.Path(path)
    path.write_bytes(buf.getvalue())
    return path
