"""Throughput of `vlm-jax data convert` (webdataset tars -> ArrayRecord) per worker process.

    python benchmarks/convert.py                   # 2000 JPEGs in 8 tar shards, 1 and 2 workers
    python benchmarks/convert.py --n 4000 --shards 16 --workers 1 2 4

Writes img2dataset-like tar shards (JPEG images with random 256-640 px sides and smooth content
that compresses like photos, a caption and a JSON member each; 5 % of the samples bad: a missing
caption or a truncated image), then converts them with
:func:`input_pipeline.tools.convert_shards` (stream each tar, check every record with the
training pipeline's ``DecodePair`` -- a full decode of the image --, write ArrayRecord) on 1, 2,
... worker processes. The start of the worker processes' server (once per conversion) is
measured apart and left out of the rates. The baseline is the least a
checking converter must do: the same images, already in memory, decoded by PIL on one process.

On a machine shared with other jobs the figures vary with its load; the 1-minute load average
is printed next to each row.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from input_pipeline import sources, tools  # noqa: E402
import synthetic_shards  # noqa: E402  (benchmarks/)


def write_shards(root: str, n: int, shards: int, bad_fraction: float = 0.05) -> list[str]:
    """``shards`` tar shards of ``n`` samples (``<key>.jpg``, ``.txt``, ``.json``), 5 % bad."""
    return synthetic_shards.write_shards(root, n, shards, metadata=True,
                                         bad_fraction=bad_fraction)


def decode_baseline(paths: list[str]) -> tuple[int, float]:
    """(images, CPU seconds) of PIL decode + RGB conversion of every image, bytes in memory."""
    src = sources.WebDatasetSource(paths)
    images = [src[i]["image"] for i in range(len(src))]
    start = time.process_time()
    for data in images:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB")
        except OSError:  # the truncated ones
            pass
    return len(images), time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        os.makedirs(os.path.join(root, "in"))
        paths = write_shards(os.path.join(root, "in"), args.n, args.shards)
        mb = sum(os.path.getsize(p) for p in paths) / 2**20
        print(f"{args.n} samples, {args.shards} tar shards, {mb:.0f} MiB; "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
        n, cpu = decode_baseline(paths)
        base = n / cpu
        # Wall-clock rates depend on how much of the cores the workers get; CPU time per sample
        # (measured by each worker, time.process_time) does not: samples per CPU-second is the
        # rate of one worker that has a core to itself.
        print("| run | workers | wall s | samples/s (wall) | samples per CPU-second of a worker "
              "| vs PIL decode | load avg |")
        print("|---|---|---|---|---|---|---|")
        print(f"| PIL decode + RGB only, bytes in memory | 1 | | | {base:,.0f} | 100% "
              f"| {os.getloadavg()[0]:.1f} |")
        # Start the worker processes' server once (a real conversion pays this once, seconds,
        # for hours of work); the timed runs fork their workers from it.
        start = time.perf_counter()
        tools.convert_shards(",".join(paths[:2]), os.path.join(root, "warm", "x"), workers=2,
                             progress=False)
        warm = time.perf_counter() - start
        for w in args.workers:
            out = os.path.join(root, f"out{w}")
            start = time.perf_counter()
            report = tools.convert_shards(os.path.join(root, "in", "bench-*.tar"),
                                          os.path.join(out, "train"), workers=w, progress=False)
            secs = time.perf_counter() - start
            seen = report.stats["seen"]
            per_cpu = seen / report.cpu_seconds
            print(f"| convert: stream tar, DecodePair checks, write ArrayRecord | {w} | "
                  f"{secs:.1f} | {seen / secs:,.0f} | {per_cpu:,.0f} | {per_cpu / base:.0%} | "
                  f"{os.getloadavg()[0]:.1f} |")
            shutil.rmtree(out)
        print(f"worker start (forkserver importing input_pipeline.tools, once per run): "
              f"{warm:.1f} s, not in the rates above")
        print(f"written {report.stats['written']}, bad {report.stats['skipped']}: "
              + ", ".join(f"{k.split('/')[1]} {v}" for k, v in report.stats.items()
                          if k.startswith("skipped/")))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
