"""Webdataset start-up against corpus size, 'indexed' vs 'stream' (config.data.webdataset_mode),
and streamed images/s against bare PIL.

    python benchmarks/webdataset_startup.py                    # 10, 100, 1000 shards
    python benchmarks/webdataset_startup.py --shards 10 100 1000 --workers 0 1 2

Writes 1,000 local tar shards of 20 small JPEGs (96-160 px) with captions, then, for the first
10, 100 and 1,000 of them (brace ranges over the same files, so the page cache treats every
row alike) and each mode, in that order:

* start-up: opening the source (indexed: every shard's headers read; stream: the shards
  listed) and building the iterator;
* first batch: from there to the first batch of 32 (64 px crops): grain's pipeline starting,
  the shuffle buffer (stream: 1,000 samples, the default) filling, decode and crop;
* pickled source: the bytes of the source object each grain worker process receives (the
  index, for 'indexed').

The second table streams 2,000 images through the training pipeline with 0, 1 and 2 grain
workers (start-up and first batch excluded) against a loop of PIL decode + resize to 64 px
over the same tar members on one process (bytes already in memory).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from input_pipeline import pipeline, sources  # noqa: E402
from input_pipeline.tokenizers import load_tokenizer  # noqa: E402
import synthetic_shards  # noqa: E402  (benchmarks/)

PER_SHARD = 20
BATCH = 32
SIZE = 64


def write_shards(root: str, shards: int) -> str:
    """``shards`` tar shards of ``PER_SHARD`` JPEGs; returns the brace pattern's prefix."""
    synthetic_shards.write_shards(root, shards * PER_SHARD, shards, sides=(96, 160), block=16,
                                  caption="a photo of object number {i}")
    return os.path.join(root, "bench-")


def pattern(prefix: str, shards: int) -> str:
    return f"{prefix}{{00000..{shards - 1:05d}}}.tar"


def open_iterator(mode: str, files: str, tokenizer, workers: int = 0):
    """(source, iterator) of ``mode`` over ``files``, as vlm_jax.data builds them."""
    kw = dict(tokenizer=tokenizer, global_batch_size=BATCH, seed=0, image_size=SIZE,
              process_index=0, process_count=1, worker_count=workers)
    if mode == "indexed":
        src = sources.WebDatasetSource(files)
        return src, pipeline.create_pair_iterator(src, **kw)
    src = sources.WebDatasetShards(files)
    return src, pipeline.create_webdataset_stream_iterator(src, mode=mode, **kw)


def startup(mode: str, files: str, tokenizer) -> tuple[float, float, int]:
    """(start-up s, first-batch s, pickled source bytes)."""
    t0 = time.perf_counter()
    src, it = open_iterator(mode, files, tokenizer)
    t1 = time.perf_counter()
    batch = next(it)
    t2 = time.perf_counter()
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 3)
    it.close()
    return t1 - t0, t2 - t1, len(pickle.dumps(src))


def pil_rate(files: str, n: int) -> float:
    blobs = []
    for path in sources.expand_paths(files):
        for _, record, _ in sources.iter_tar_samples(path):
            blobs.append(record["image"])
            if len(blobs) == n:
                break
        if len(blobs) == n:
            break
    t = time.perf_counter()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return len(blobs) / (time.perf_counter() - t)


def stream_rate(files: str, tokenizer, n: int, workers: int) -> float:
    _, it = open_iterator("stream", files, tokenizer, workers)
    next(it)  # start-up (worker processes, buffer fill) excluded
    steps = max(1, n // BATCH)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    rate = steps * BATCH / (time.perf_counter() - t)
    it.close()
    return rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--modes", nargs="+", default=["indexed", "stream"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=2000, help="images timed per throughput row")
    args = p.parse_args(argv)
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.FLAGS(sys.argv[:1], known_only=True)  # grain workers read absl flags
    tokenizer = load_tokenizer("clip_bpe", 77)
    with tempfile.TemporaryDirectory() as root:
        prefix = write_shards(root, max(args.shards))
        startup("stream", pattern(prefix, 2), tokenizer)  # warm-up: imports, first compile
        print(f"# {PER_SHARD} JPEGs (96-160 px) per shard, local files; batch {BATCH}, "
              f"{SIZE} px; {os.cpu_count()} cores")
        print("| shards | samples | mode | start-up (s) | first batch (s) | start-up + first "
              "batch (s) | pickled source |")
        print("|---|---|---|---|---|---|---|")
        for shards in args.shards:
            for mode in args.modes:
                up, first, size = startup(mode, pattern(prefix, shards), tokenizer)
                print(f"| {shards} | {shards * PER_SHARD} | {mode} | {up:.3f} | {first:.3f} | "
                      f"{up + first:.3f} | {size / 1024:.1f} KiB |", flush=True)
        files = pattern(prefix, max(args.shards))
        base = pil_rate(files, args.n)
        print()
        print("| loader | images/s | vs PIL |")
        print("|---|---|---|")
        print(f"| PIL decode + resize {SIZE} px, 1 process (bytes in memory) | {base:.0f} | "
              "100% |")
        for w in args.workers:
            rate = stream_rate(files, tokenizer, args.n, w)
            how = f"{w} grain worker(s)" if w else "main process"
            print(f"| stream mode, {how}: read, shuffle buffer, decode, crop, tokenise, batch | "
                  f"{rate:.0f} | {100 * rate / base:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
