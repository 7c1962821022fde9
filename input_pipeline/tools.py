"""Dataset tools behind ``vlm-jax data export | convert | inspect``.

* :func:`export_webdataset` writes a split of a prepared TFDS dataset (e.g. the embedded
  shapes) as img2dataset-style tar shards (``<key>.png``, ``<key>.txt``, ``<key>.json``).
* :func:`convert_shards` (:func:`convert_to_array_record`) turns webdataset tar shards, or a
  folder of images with a captions CSV/JSONL, into ArrayRecord shards (the fastest format for
  grain's random access), local or on ``gs://``: checked with the training pipeline's checks
  (bad samples dropped and counted by reason), in parallel over worker processes and hosts
  with the same output whatever their number, and resumable (finished shards are kept).
* :func:`inspect` counts samples, bad samples by reason and caption lengths, and draws a PNG
  grid of samples with their captions.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from input_pipeline import DataError, sources
from input_pipeline.transforms import DecodePair, SkipStats, to_str

log = logging.getLogger(__name__)


def export_webdataset(data_dir: str, dataset: str, config_name: str, split: str, out_dir: str,
                      shard_size: int = 1000) -> list[str]:
    """Writes ``split`` of a prepared TFDS dataset as tar shards ``<out_dir>/<split>-NNNNN.tar``.

    Each shard is written to a temporary name and renamed when complete.
    """
    from input_pipeline import pipeline  # pylint: disable=import-outside-toplevel

    source, _ = pipeline._data_source(data_dir, dataset, config_name, split)  # pylint: disable=protected-access
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(source) // shard_size)
    paths = []
    with tqdm(total=len(source), unit="sample", desc=f"export {split}") as bar:
        for s in range(n_shards):
            path = out / f"{split}-{s:05d}.tar"
            # Objects (gs://) are written in place: an upload becomes visible only when complete
            # (and they have no atomic rename).
            tmp = path if "://" in str(out) else out / f".{split}-{s:05d}.tar.tmp"
            with tmp.open("wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
                for i in range(s * shard_size, min(len(source), (s + 1) * shard_size)):
                    r = source[i]
                    image = r["image"]
                    image = image.item() if isinstance(image, np.ndarray) else image
                    key = f"{i:09d}"
                    meta = {"label": int(r.get("label", -1)), "index": i}
                    for ext, data in (("png", image), ("txt", to_str(r["caption"]).encode()),
                                      ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    bar.update(1)
            if tmp != path:
                tmp.replace(path)
            paths.append(os.fspath(path))
    return paths


# -------------------------------------------------------------------------------------------
# convert: webdataset tars / image folders -> ArrayRecord, in parallel, resumable.
# -------------------------------------------------------------------------------------------

FOLDER_SHARD_SIZE = 10_000  # default records per output shard of an image-folder conversion


@dataclasses.dataclass(frozen=True)
class ConvertTask:
    """One output shard and what goes into it: a contiguous group of input tar shards
    (``tars``), or rows ``(file, caption)`` of an image folder's captions file (``rows``)."""

    index: int
    output: str
    tars: tuple[str, ...] = ()
    folder: str | None = None
    rows: tuple[tuple[str, str], ...] = ()


def _read_caption_rows(captions: str) -> list[tuple[str, str]]:
    """``(file, caption)`` rows of a CSV (columns ``file,caption``) or JSONL captions file."""
    path = epath.Path(captions)
    if not path.exists():
        raise DataError(f"Captions file {captions} does not exist.")
    with path.open("r") as f:
        if captions.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    out = []
    for n, row in enumerate(rows):
        if "file" not in row or "caption" not in row:
            raise DataError(f"{captions} row {n + 1} lacks 'file' or 'caption': {row}.")
        out.append((row["file"], row["caption"]))
    return out


def _folder_records(folder: str, rows) -> Iterator[tuple[dict[str, Any], float]]:
    """(record, fraction of ``rows`` done) for the image files ``rows`` name (relative to
    ``folder``); a missing file gives a record without image."""
    root = epath.Path(folder)
    for n, (file, caption) in enumerate(rows):
        image_path = root / file
        try:
            image = image_path.read_bytes()
        except FileNotFoundError:
            image = None
        yield ({"key": os.path.splitext(file)[0], "image": image, "caption": caption,
                "metadata": None}, (n + 1) / len(rows))


def _tar_records(path: str, damaged: list[tuple[str, str]]
                 ) -> Iterator[tuple[dict[str, Any], float]]:
    """(record, fraction of the file read) for the samples of one tar shard, read front to back
    by :func:`input_pipeline.sources.iter_tar_samples` (the streamed sources' reader: members
    grouped by key as :class:`~input_pipeline.sources.WebDatasetSource` groups them). One
    sequential read per shard: a conversion reads every byte anyway, and WebDatasetSource's
    index-then-seek access would cost a ranged GET per member on gs://. A shard that is not a
    tar or is truncated is appended to ``damaged`` with the reason; the samples before the
    damage are kept.
    """
    try:
        with epath.Path(path).open("rb") as f:
            size = max(f.seek(0, os.SEEK_END), 1)
        for _, record, after in sources.iter_tar_samples(path):
            yield record, 1.0 if after is None else min(after / size, 1.0)
    except (tarfile.TarError, OSError, EOFError) as e:
        damaged.append((path, f"{type(e).__name__}: {e}"))
        log.warning("Tar shard %s is damaged (%s); its samples before the damage are "
                    "converted.", path, damaged[-1][1])


def plan_conversion(inputs: str, out_prefix: str, num_shards: int | None = None,
                    captions: str | None = None) -> list[ConvertTask]:
    """The output shards of a conversion and what goes into each: a function of the inputs and
    ``num_shards`` only (never of the worker or process count), so every way of running it
    writes the same files.

    Tar shards (``inputs`` a pattern, sorted by :func:`sources.expand_paths`) are split into
    ``num_shards`` contiguous groups (default: one output shard per input shard); an image
    folder's captions rows into ``num_shards`` contiguous blocks (default: one per
    :data:`FOLDER_SHARD_SIZE` rows). Output shard ``i`` is
    ``<out_prefix>-<i:05d>-of-<num_shards:05d>.array_record``.

    Raises:
        DataError: no inputs, more output shards than input tar shards, or a bad ``out_prefix``.
    """
    if not out_prefix or out_prefix.endswith("/") or os.path.basename(out_prefix) in (".", ".."):
        raise DataError(f"--output {out_prefix!r} must be a path prefix such as records/train "
                        "(shards are written as records/train-00000-of-00004.array_record).")
    if num_shards is not None and num_shards < 1:
        raise DataError(f"--num_shards must be at least 1 (got {num_shards}).")
    if captions:
        rows = _read_caption_rows(captions)
        if not rows:
            raise DataError(f"Captions file {captions} has no rows.")
        n = num_shards or -(-len(rows) // FOLDER_SHARD_SIZE)
        n = min(n, len(rows))
        groups = [tuple(map(tuple, g)) for g in _split(rows, n)]
        return [ConvertTask(i, _shard_name(out_prefix, i, n), folder=inputs, rows=g)
                for i, g in enumerate(groups)]
    tars = sources.expand_paths(inputs)
    n = num_shards or len(tars)
    if n > len(tars):
        raise DataError(f"--num_shards {n} is more than the {len(tars)} input tar shard(s) of "
                        f"{inputs!r}: each output shard takes whole input shards. Use at most "
                        f"{len(tars)} (or leave --num_shards out: one output per input).")
    return [ConvertTask(i, _shard_name(out_prefix, i, n), tars=tuple(g))
            for i, g in enumerate(_split(tars, n))]


def _split(items: list, n: int) -> list[list]:
    """``items`` in ``n`` contiguous groups whose sizes differ by at most one."""
    q, r = divmod(len(items), n)
    bounds = [i * q + min(i, r) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


def _shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}.array_record"


_PROGRESS = None  # a worker process's queue to the parent's progress bar (set by _init_worker)


def _init_worker(queue, environ: dict[str, str]) -> None:
    """Worker set-up: the progress queue, and the parent's environment as it is now (a worker
    is forked from the forkserver, whose environment is the parent's when the server started:
    storage settings such as ``STORAGE_EMULATOR_HOST`` set since then would be missing)."""
    global _PROGRESS  # pylint: disable=global-statement
    _PROGRESS = queue
    os.environ.clear()
    os.environ.update(environ)


def _convert_task(task: ConvertTask, keep_bad: bool = False, progress=None) -> dict[str, Any]:
    """Converts one output shard (:func:`sources.write_array_record_shard`: it appears under its
    name only when complete); returns ``{'output', 'stats', 'damaged'}``. ``progress(shards,
    samples, skipped)`` (or, in a worker process, the parent's queue) receives increments about
    twice a second. ``cpu_seconds``: this process's CPU time for the shard."""
    cpu = time.process_time()
    if progress is None and _PROGRESS is not None:
        progress = lambda *x: _PROGRESS.put(x)  # noqa: E731
    stats, damaged, check = SkipStats(), [], DecodePair()
    state = {"done": 0.0, "seen": 0, "skipped": 0, "time": time.monotonic()}

    def report(done: float, force: bool = False) -> None:
        now = time.monotonic()
        if progress is not None and (force or now - state["time"] > 0.5):
            skipped = sum(stats.skipped.values())
            progress(done - state["done"], stats.seen - state["seen"], skipped - state["skipped"])
            state.update(done=done, seen=stats.seen, skipped=skipped, time=now)

    def records() -> Iterator[dict[str, Any]]:
        if task.folder is not None:
            parts = [(_folder_records(task.folder, task.rows), 0.0, 1.0)]
        else:
            k = len(task.tars)
            parts = [(_tar_records(p, damaged), j / k, 1 / k) for j, p in enumerate(task.tars)]
        for stream, base, weight in parts:
            for record, fraction in stream:
                # The training pipeline's own checks (input_pipeline.transforms.DecodePair):
                # a record dropped here is one training would have skipped.
                reason, _, _ = check._check(record)  # pylint: disable=protected-access
                stats.record(reason)
                if reason is None or keep_bad:
                    yield record
                report(base + weight * fraction)

    written = sources.write_array_record_shard(records(), task.output)
    report(1.0, force=True)
    out = stats.snapshot()
    out["written"] = written
    return {"output": task.output, "stats": out, "damaged": damaged,
            "cpu_seconds": time.process_time() - cpu}


@dataclasses.dataclass
class ConvertReport:
    """What :func:`convert_shards` did in this process.

    ``paths``: every output shard of the conversion (all processes'); ``converted`` /
    ``already_done``: this process's shards written in this run / found complete and kept;
    ``stats``: ``seen``, ``written``, ``skipped`` and ``skipped/<reason>`` (the reasons of
    :data:`input_pipeline.transforms.SKIP_REASONS`) over the converted shards; ``damaged``:
    input tar shards read only up to their damage, with the reason; ``cpu_seconds``: CPU time
    the workers spent on the converted shards (``seen / cpu_seconds`` is the rate per core of a
    machine where the workers get whole cores).
    """

    paths: list[str]
    converted: list[str]
    already_done: list[str]
    stats: dict[str, int]
    damaged: list[tuple[str, str]]
    seconds: float
    workers: int
    process_index: int = 0
    process_count: int = 1
    keep_bad: bool = False
    cpu_seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for the terminal: shards, samples, skips by reason, rate."""
        s = self.stats
        where = (f" (process {self.process_index} of {self.process_count})"
                 if self.process_count > 1 else "")
        lines = [f"{len(self.paths)} ArrayRecord shard(s) {_shards_pattern(self.paths)}{where}: "
                 f"{len(self.converted)} converted now, {len(self.already_done)} already "
                 "complete (kept; their counts are not repeated here)."]
        reasons = ", ".join(f"{k.split('/', 1)[1]} {v:,}" for k, v in s.items()
                            if k.startswith("skipped/"))
        what = "kept as they are (--keep_bad)" if self.keep_bad else "dropped"
        lines.append(f"samples read {s.get('seen', 0):,}, written {s.get('written', 0):,}, "
                     f"bad {s.get('skipped', 0):,} ({what})" + (f": {reasons}" if reasons else ""))
        for path, why in self.damaged:
            lines.append(f"damaged input shard, read up to the damage: {path} ({why})")
        rate = s.get("seen", 0) / self.seconds if self.seconds > 0 else 0.0
        per_core = s.get("seen", 0) / self.cpu_seconds if self.cpu_seconds > 0 else 0.0
        lines.append(f"{s.get('seen', 0):,} samples in {self.seconds:.1f} s: {rate:,.0f} "
                     f"samples/s with {self.workers} worker process(es); {per_core:,.0f} "
                     "samples per CPU-second of a worker")
        return "\n".join(lines)


def _shards_pattern(paths: list[str]) -> str:
    if len(paths) == 1:
        return paths[0]
    n = len(paths)
    return paths[0].replace(f"-00000-of-{n:05d}", f"-{{00000..{n - 1:05d}}}-of-{n:05d}")


def _existing_outputs(tasks: list[ConvertTask]) -> set[str]:
    """Names of the finished output shards, from one listing of the output directory (one
    paginated request per 1000 objects on gs://, instead of a stat per shard)."""
    if not tasks:
        return set()
    out_dir = epath.Path(tasks[0].output).parent
    suffix = tasks[0].output.rsplit("-", 2)[-1]  # "<n>.array_record"
    stem = os.path.basename(tasks[0].output)[:-len("-00000-of-" + suffix)]
    try:
        if not out_dir.exists():
            url = os.fspath(out_dir)
            if "://" in url:  # No object under the prefix yet (gs:// has no directories).
                scheme, rest = url.split("://", 1)
                bucket = epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")
                if not bucket.exists():  # Said now, not after the first shard is converted.
                    raise DataError(f"Cannot write to {url}: bucket {bucket} does not exist "
                                    "(create it, e.g. `gcloud storage buckets create`, or fix "
                                    "--output).")
                return set()
            out_dir.mkdir(parents=True, exist_ok=True)
            return set()
        return {p.name for p in out_dir.glob(f"{stem}-*-of-{suffix}")}
    except FileNotFoundError as e:  # gcsfs: the bucket does not exist
        raise DataError(f"Cannot write to {out_dir}: {e} (does the bucket exist?).") from e
    except OSError as e:
        raise DataError(f"Cannot list {out_dir}: {type(e).__name__}: {e}; check the path and "
                        "the credentials (`gcloud storage ls` with the same account).") from e


def convert_shards(inputs: str, out_prefix: str, num_shards: int | None = None,
                   captions: str | None = None, *, workers: int = 1, process_index: int = 0,
                   process_count: int = 1, keep_bad: bool = False,
                   progress: bool = True) -> ConvertReport:
    """Webdataset tar shards (``inputs`` = pattern) or an image folder (``inputs`` = folder,
    ``captions`` = CSV/JSONL) -> ArrayRecord shards
    ``<out_prefix>-NNNNN-of-NNNNN.array_record``, local or ``gs://``; the engine of
    ``vlm-jax data convert``.

    * **Deterministic**: :func:`plan_conversion` fixes what goes into each output shard from
      the inputs and ``num_shards`` alone; records keep their input order. Any ``workers`` /
      ``process_count`` writes byte-identical files.
    * **Parallel**: process ``process_index`` of ``process_count`` (hosts, each running this
      with its own index) converts output shards ``i`` with ``i % process_count ==
      process_index``, with ``workers`` worker processes (1: in this process).
    * **Resumable**: a shard appears under its final name only once complete (local: rename of
      a temporary file; gs://: upload of the finished local file, see
      :func:`sources.write_array_record_shard`), so the shards present at start are complete;
      they are kept and skipped, and a killed run resumes with the same command.
    * **Checked**: every record goes through the training pipeline's checks
      (:class:`input_pipeline.transforms.DecodePair`: image and caption present, caption
      UTF-8 and not blank, image decodes, 8 px to 64M px); bad ones are dropped and counted
      by reason (``keep_bad``: written anyway, still counted).

    A tqdm bar counts output shards (fractions within a shard, with the samples read) on
    stderr. Returns a :class:`ConvertReport` (``.summary()`` for the terminal).

    Raises:
        DataError: bad inputs or output (see :func:`plan_conversion`), bad ``workers`` /
            ``process_index``, or a shard that cannot be written (the finished ones are kept).
    """
    if workers < 1:
        raise DataError(f"--workers must be at least 1 (got {workers}).")
    if not 0 <= process_index < process_count:
        raise DataError(f"--process_id {process_index} is not in [0, --num_processes "
                        f"{process_count}).")
    start = time.monotonic()
    tasks = plan_conversion(inputs, out_prefix, num_shards, captions)
    mine = [t for t in tasks if t.index % process_count == process_index]
    existing = _existing_outputs(mine)
    todo = [t for t in mine if os.path.basename(t.output) not in existing]
    done = [t.output for t in mine if os.path.basename(t.output) in existing]
    report = ConvertReport([t.output for t in tasks], [], done, {"seen": 0, "written": 0,
                                                                   "skipped": 0}, [], 0.0,
                           min(workers, max(len(todo), 1)), process_index, process_count,
                           keep_bad)
    bar = tqdm(total=len(todo), unit="shard", desc="convert", disable=not progress or not todo,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} shards "
                          "[{elapsed}<{remaining}{postfix}]")
    counts = {"samples": 0, "bad": 0}

    def on_progress(shards: float, samples: int, skipped: int) -> None:
        counts["samples"] += samples
        counts["bad"] += skipped
        elapsed = max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{counts['samples']:,} samples, {counts['samples'] / elapsed:,.0f}"
                            f"/s, {counts['bad']:,} bad", refresh=False)
        bar.update(shards)

    def merge(result: dict[str, Any]) -> None:
        report.converted.append(result["output"])
        report.damaged.extend(result["damaged"])
        report.cpu_seconds += result["cpu_seconds"]
        for k, v in result["stats"].items():
            if k.startswith("dropped_images/"):
                continue
            report.stats[k] = report.stats.get(k, 0) + v

    try:
        if report.workers == 1:
            for task in todo:
                merge(_write_task(task, keep_bad, on_progress))
        else:
            _run_pool(todo, keep_bad, report.workers, on_progress, merge)
    finally:
        bar.close()
    report.stats = dict(sorted(report.stats.items(), key=lambda kv: ("/" in kv[0], kv[0])))
    report.converted.sort()
    report.seconds = time.monotonic() - start
    return report


def _write_task(task: ConvertTask, keep_bad: bool, progress=None) -> dict[str, Any]:
    """:func:`_convert_task` with a write failure turned into a DataError naming the shard."""
    try:
        return _convert_task(task, keep_bad, progress)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"Cannot write ArrayRecord shard {task.output}: {type(e).__name__}: "
                        f"{e}. The shards already written are kept; the same command resumes."
                        ) from e


def _run_pool(todo, keep_bad, workers, on_progress, merge) -> None:
    """Runs the tasks on ``workers`` forked worker processes; progress increments come back
    through a queue. The first failure cancels the tasks not yet started, lets the running ones finish
    (their shards are kept) and is raised."""
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    import multiprocessing  # pylint: disable=import-outside-toplevel
    import queue as queue_lib  # pylint: disable=import-outside-toplevel

    # forkserver, not fork: the parent may hold threads (grain, gcsfs's event loop) that a fork
    # would copy in an undefined state; the server is a fresh process. With this module
    # preloaded in it, workers are forked already importing it (jax, through grain: seconds),
    # where spawn would import it once per worker.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    queue = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                on_progress(*queue.get_nowait())
            except queue_lib.Empty:
                return

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(queue, dict(os.environ))) as pool:
        pending = {pool.submit(_write_task, t, keep_bad) for t in todo}
        try:
            while pending:
                finished, pending = concurrent.futures.wait(
                    pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
                drain()
                for future in finished:
                    merge(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            drain()


def convert_to_array_record(inputs: str, out_prefix: str, num_shards: int | None = None,
                            captions: str | None = None, **kwargs) -> list[str]:
    """:func:`convert_shards` returning the paths of all output shards (keyword arguments
    ``workers``, ``process_index``, ``process_count``, ``keep_bad``, ``progress`` pass on)."""
    return convert_shards(inputs, out_prefix, num_shards, captions, **kwargs).paths


def inspect(kind: str, inputs: str, out_png: str | None = None, num_samples: int = 16,
            max_scan: int | None = None, decode: DecodePair | None = None) -> dict[str, Any]:
    """Counts, bad samples by reason and caption-length statistics of a source; optionally a
    PNG grid of the first ``num_samples`` good samples with their captions. ``decode``: the
    checks and sample filters to count with (default: the unusable samples only)."""
    src = sources.open_source(kind, inputs)
    n = len(src) if max_scan is None else min(len(src), max_scan)
    stats, decode = SkipStats(), decode or DecodePair()
    lengths, shown = [], []
    for i in tqdm(range(n), unit="sample", desc="inspect"):
        reason, image, caption = decode._check(src[i])  # pylint: disable=protected-access
        stats.record(reason)
        if reason is None:
            lengths.append(len(caption.split()))
            if len(shown) < num_samples:
                shown.append((image, caption))
    report: dict[str, Any] = {"samples": len(src), "scanned": n, **stats.snapshot()}
    report["skipped_shards"] = [list(x) for x in getattr(src, "skipped_shards", [])]
    if lengths:
        report["caption_words"] = {"mean": float(np.mean(lengths)), "min": int(np.min(lengths)),
                                   "p50": float(np.median(lengths)),
                                   "p95": float(np.percentile(lengths, 95)),
                                   "max": int(np.max(lengths))}
    if out_png and shown:
        _grid(shown, out_png)
        report["grid"] = out_png
    return report


def _grid(samples: list, out_png: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import textwrap  # pylint: disable=import-outside-toplevel

    cols = min(4, len(samples))
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, samples):
        ax.imshow(np.asarray(Image.fromarray(image).resize((128, 128))))
        ax.set_title("\n".join(textwrap.wrap(caption, 28)[:3]), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()  # matplotlib writes only local files: render, then write through epath.
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    epath.Path(out_png).write_bytes(buf.getvalue())
