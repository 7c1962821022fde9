"""Dataset tools behind ``vlm-jax data export | convert | inspect``.

* :func:`export_webdataset` writes a split of a prepared TFDS dataset (e.g. the embedded
  shapes) as img2dataset-style tar shards (``<key>.png``, ``<key>.txt``, ``<key>.json``).
* :func:`convert_to_array_record` turns webdataset tar shards, or a folder of images with a
  captions CSV/JSONL, into ArrayRecord shards (the fastest format for grain's random access).
* :func:`inspect` counts samples, bad samples by reason and caption lengths, and draws a PNG
  grid of samples with their captions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from input_pipeline import DataError, sources
from input_pipeline.transforms import DecodePair, SkipStats, to_str


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


def _folder_records(folder: str, captions: str) -> Iterator[dict[str, Any]]:
    """Records of an image folder with a captions file: CSV with columns ``file,caption`` or
    JSONL with ``{"file": ..., "caption": ...}`` per line (file paths relative to the folder)."""
    root = epath.Path(folder)
    path = epath.Path(captions)
    if not path.exists():
        raise DataError(f"Captions file {captions} does not exist.")
    with path.open("r") as f:
        if captions.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    for n, row in enumerate(rows):
        if "file" not in row or "caption" not in row:
            raise DataError(f"{captions} row {n + 1} lacks 'file' or 'caption': {row}.")
        image_path = root / row["file"]
        image = image_path.read_bytes() if image_path.exists() else None
        yield {"key": os.path.splitext(row["file"])[0], "image": image,
               "caption": row["caption"], "metadata": None}


def convert_to_array_record(inputs: str, out_prefix: str, num_shards: int = 1,
                            captions: str | None = None) -> list[str]:
    """Webdataset tars (``inputs`` = shard pattern) or an image folder (``inputs`` = folder,
    ``captions`` = CSV/JSONL) -> ArrayRecord shards ``<out_prefix>-NNNNN-of-NNNNN.array_record``.

    Records are copied as they are (bad samples included: the training pipeline skips and
    counts them, so the counts stay visible).
    """
    if captions:
        records = list(_folder_records(inputs, captions))
        total = len(records)
    else:
        src = sources.WebDatasetSource(inputs)
        total = len(src)
        records = (src[i] for i in range(total))
    bar = tqdm(records, total=total, unit="sample", desc="convert")
    return sources.write_array_record(bar, out_prefix, num_shards=num_shards)


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
