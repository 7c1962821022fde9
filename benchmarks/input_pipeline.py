"""Input pipeline throughput at 224 px: the grain pipeline against plain PIL on the same files.

    python benchmarks/input_pipeline.py                       # 2000 JPEGs, 4 tar shards
    python benchmarks/input_pipeline.py --workers 0 2 --n 4000

Writes webdataset tar shards of JPEG images (random 256-640 px sides, as web images are) with
captions, then measures in one run:

* baseline: a loop over the same tar members that only does PIL decode + resize to 224 x 224
  (the least any loader must do);
* the training pipeline (:func:`input_pipeline.pipeline.create_pair_iterator`: global shuffle,
  decode + checks, random-resized crop, tokenisation to 77, uint8 batching; CLIP
  normalisation happens on the device), with ``worker_count`` grain worker processes.

The baseline runs on 1 process and on all cores (a process pool), with the image bytes already
in memory; the pipeline's overhead is 1 - its images/s over the all-cores baseline.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from input_pipeline import pipeline, sources  # noqa: E402
from input_pipeline.tokenizers import train_sentencepiece, SentencePieceTokenizer  # noqa: E402
import synthetic_shards  # noqa: E402  (benchmarks/)


def write_shards(root: str, n: int, shards: int) -> list[str]:
    return synthetic_shards.write_shards(root, n, shards)


def _decode_resize(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))


def baseline(src, n: int, processes: int) -> float:
    """PIL decode + resize of the first ``n`` samples' image bytes, on ``processes`` processes."""
    blobs = [src[i]["image"] for i in range(n)]  # reading excluded: the best case for PIL
    t = time.perf_counter()
    if processes == 1:
        for b in blobs:
            _decode_resize(b)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            t = time.perf_counter()
            pool.map(_decode_resize, blobs, chunksize=16)
    return n / (time.perf_counter() - t)


def grain_rate(src, tokenizer, n: int, workers: int, batch: int = 64) -> float:
    it = pipeline.create_pair_iterator(src, tokenizer=tokenizer, global_batch_size=batch,
                                       seed=0, image_size=224, process_index=0, process_count=1,
                                       worker_count=workers)
    next(it)  # start-up (worker processes, first reads) excluded
    steps = max(1, n // batch - 1)
    t = time.perf_counter()
    for _ in range(steps):
        b = next(it)
    assert b["image"].shape == (batch, 224, 224, 3)
    return steps * batch / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args(argv)
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.FLAGS(sys.argv[:1], known_only=True)  # grain workers read absl flags
    with tempfile.TemporaryDirectory() as root:
        write_shards(root, args.n, args.shards)
        src = sources.WebDatasetSource(os.path.join(root, "bench-*.tar"))
        spm_prefix = os.path.join(root, "spm")
        train_sentencepiece([src[i]["caption"].decode() for i in range(200)], spm_prefix,
                            vocab_size=64)
        tok = SentencePieceTokenizer(spm_prefix + ".model", context_length=77)
        cores = os.cpu_count() or 1
        base1 = baseline(src, min(args.n, 600), 1)
        base_all = baseline(src, args.n, cores)
        print(f"# {args.n} JPEGs (256-640 px) in {args.shards} tar shards; {cores} cores")
        print("| loader | images/s | vs PIL on all cores |")
        print("|---|---|---|")
        print(f"| PIL decode + resize 224, 1 process (bytes already in memory) | {base1:.0f} | "
              f"{100 * base1 / base_all:.0f}% |")
        print(f"| PIL decode + resize 224, {cores} processes (bytes already in memory) | "
              f"{base_all:.0f} | 100% |")
        for w in args.workers:
            rate = grain_rate(src, tok, args.n, w)
            how = f"{w} worker processes" if w else "main process, grain read threads"
            print(f"| grain pipeline from tar shards ({how}): read, decode, checks, "
                  f"random-resized crop, tokenise, uint8 batch | {rate:.0f} | "
                  f"{100 * rate / base_all:.0f}% |", flush=True)

if __name__ == "__main__":
    main()
