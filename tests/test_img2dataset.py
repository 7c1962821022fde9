"""img2dataset end to end: the real img2dataset downloads a url/caption parquet from a local HTTP
server into webdataset shards, which vlm_jax counts, filters, trains on and converts.

What reaches vlm_jax must be counted exactly: img2dataset drops the failed downloads (its
``<shard>_stats.json`` counts them), every sample it wrote is seen once per epoch, and each is
skipped for the reason the parquet row implies (null caption, one-word caption, similarity,
NSFW tag, aspect ratio), written out below from the rows themselves.

Needs ``pip install -e ".[img2dataset]"`` (skipped otherwise); no internet: the images are
served from 127.0.0.1.
"""
import http.server
import importlib.util
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from input_pipeline import pipeline, sources, transforms
from input_pipeline.tokenizers import load_tokenizer
from vlm_jax import config as config_lib
from vlm_jax import data as data_lib

pytestmark = [
    pytest.mark.e2e, pytest.mark.img2dataset,
    pytest.mark.skipif(importlib.util.find_spec("img2dataset") is None
                       or importlib.util.find_spec("pyarrow") is None,
                       reason="img2dataset is not installed: pip install -e \".[img2dataset]\""),
]

N = 48
SHARD_SIZE = 20  # img2dataset's number_sample_per_shard: 3 shards of 20, 20 and 8 rows
MISSING = {5, 17, 29, 41}  # URLs that answer 404
NOT_AN_IMAGE = {30}  # answers 200 with HTML: img2dataset cannot decode it
WIDE = {4, 13, 22, 40}  # 200 x 50 images (4:1); img2dataset keeps the ratio (256 x 64)
# The filters of the checks: caption, then metadata predicates, then the image (DecodePair's order).
FILTERS = ["--config.data.filters.min_caption_words=2",
           "--config.data.filters.max_aspect_ratio=3.0",
           "--config.data.filters.metadata=[\"similarity >= 0.3\", \"NSFW != 'NSFW'\"]"]


def _rows():
    """The parquet rows: url path, caption, similarity, NSFW tag, image size."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        caption = (None if i % 10 == 3 else "dog" if i % 10 == 7 else
                   f"a photo of object number {i}")
        size = ((200, 50) if i in WIDE else
                (int(rng.integers(48, 113)), int(rng.integers(48, 113))))
        rows.append(dict(i=i, path=f"/img/{i:03d}.{'png' if i % 2 else 'jpg'}", caption=caption,
                         similarity=round(float(rng.uniform(0.15, 0.45)), 4),
                         NSFW="NSFW" if i % 8 == 6 else "UNSURE" if i % 8 == 2 else "UNLIKELY",
                         size=size))
    return rows


def _expected_reason(row):
    """What vlm_jax must skip a downloaded row for under FILTERS (None: kept)."""
    if row["caption"] is None:
        return "empty_caption"  # img2dataset writes a null caption as an empty .txt
    if len(row["caption"].split()) < 2:
        return "caption_too_short"
    if row["similarity"] < 0.3:
        return "metadata:similarity"
    if row["NSFW"] == "NSFW":
        return "metadata:NSFW"
    if row["size"][0] / row["size"][1] > 3 or row["size"][1] / row["size"][0] > 3:
        return "extreme_aspect_ratio"
    return None


def _image(row):
    rng = np.random.default_rng(row["i"])
    w, h = row["size"]
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        out, format="PNG" if row["path"].endswith("png") else "JPEG")
    return out.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body, kind = self.files.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


def _env():
    # No network: albumentations (imported by img2dataset) checks for updates unless told not
    # to, wandb stays off, and a proxy must not be asked for 127.0.0.1.
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
                NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _vlm_jax(repo_root, *args):
    return subprocess.run([sys.executable, "-m", "vlm_jax.main", *args], capture_output=True,
                          text=True, cwd=repo_root, timeout=600, env=_env())


def _download(root):
    """(output folder, rows): the parquet downloaded by img2dataset as webdataset shards."""
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    root.mkdir()
    rows = _rows()
    files = {r["path"]: (_image(r), "image/png" if r["path"].endswith("png") else "image/jpeg")
             for r in rows if r["i"] not in MISSING}
    for i in NOT_AN_IMAGE:
        files[rows[i]["path"]] = (b"<html><body>moved</body></html>", "text/html")
    handler = type("Handler", (_Handler,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pq.write_table(pa.table({
        "url": [base + r["path"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "similarity": [r["similarity"] for r in rows],
        "NSFW": [r["NSFW"] for r in rows],
    }), root / "urls.parquet")
    out = root / "shards"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "img2dataset.main", "--url_list", str(root / "urls.parquet"),
             "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
             "--save_additional_columns", '["similarity","NSFW"]', "--output_format",
             "webdataset", "--output_folder", str(out), "--image_size", "64",
             "--resize_mode", "keep_ratio", "--processes_count", "1", "--thread_count", "4",
             "--number_sample_per_shard", str(SHARD_SIZE), "--timeout", "5", "--retries", "0",
             "--enable_wandb", "False"],
            capture_output=True, text=True, timeout=300, env=_env(), cwd=root)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, rows


def _downloaded_rows(rows):
    return [r for r in rows if r["i"] not in MISSING | NOT_AN_IMAGE]


def _want_counts(rows):
    """seen / skipped / skipped/<reason> for one pass over what img2dataset wrote."""
    kept = _downloaded_rows(rows)
    want = {"seen": len(kept), "skipped": 0}
    for r in kept:
        reason = _expected_reason(r)
        if reason is not None:
            want["skipped"] += 1
            want[f"skipped/{reason}"] = want.get(f"skipped/{reason}", 0) + 1
    return want


def test_img2dataset_shards_end_to_end(repo_root, shapes_data_dir, tmp_path):
    """1. What img2dataset wrote is what vlm_jax counts, exactly; 2. training and conversion
    (one test: a module fixture would run img2dataset again in every pytest-xdist worker that
    takes a test of this module)."""
    out, rows = _download(tmp_path / "img2dataset")
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert len(stats) == 3 and [s["count"] for s in stats] == [20, 20, 8]
    assert sum(s["successes"] for s in stats) == N - len(MISSING | NOT_AN_IMAGE)
    assert sum(s["failed_to_download"] for s in stats) == len(MISSING)
    assert sum(s["failed_to_resize"] for s in stats) == len(NOT_AN_IMAGE)
    want = _want_counts(rows)
    print("img2dataset:", {k: sum(s[k] for s in stats)
                           for k in ("count", "successes", "failed_to_download",
                                     "failed_to_resize")})
    print("expected from the parquet:", want)
    # Every sample img2dataset wrote, with the metadata it saved.
    src = sources.WebDatasetSource(str(out / "{00000..00002}.tar"))
    assert len(src) == sum(s["successes"] for s in stats) and not src.skipped_shards
    by_url = {r["i"]: r for r in rows}
    for k in range(len(src)):
        meta = json.loads(src[k]["metadata"])
        row = by_url[int(meta["url"].rsplit("/", 1)[1].split(".")[0])]
        assert (meta["similarity"], meta["NSFW"], meta["caption"]) == (
            row["similarity"], row["NSFW"], row["caption"])
        assert (meta["original_width"], meta["original_height"]) == row["size"]

    # The pipeline of a training run, one epoch, from the same config and overrides.
    config = config_lib.load_config(str(repo_root / "experiments/clip_tiny.py:test"),
                                    [f[len("--config."):] for f in FILTERS])
    transforms.SKIP_STATS.reset()
    it = pipeline.create_pair_iterator(
        src, tokenizer=load_tokenizer("clip_bpe", 16), global_batch_size=1, seed=0,
        image_size=32, process_index=0, process_count=1, num_epochs=1,
        filters=data_lib.sample_filters(config))
    assert sum(len(b["image"]) for b in it) == want["seen"] - want["skipped"]
    got = transforms.SKIP_STATS.snapshot()
    print("vlm_jax pipeline:", got)
    assert got == want

    # `vlm-jax data inspect` with the same config: what a pod would skip, before paying for it.
    proc = _vlm_jax(repo_root, "data", "inspect", "--input", str(out / "*.tar"), "--config",
                    "experiments/clip_tiny.py:test", *FILTERS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    print("vlm-jax data inspect:", {k: v for k, v in report.items() if k.startswith(("seen",
                                                                                    "skipped"))})
    assert {k: v for k, v in report.items() if k == "seen" or k.startswith("skipped/")
            or k == "skipped"} == want

    # 2. Training on the shards, then ArrayRecord.
    _train_then_convert(out, rows, repo_root, shapes_data_dir, tmp_path)


def _train_then_convert(out, rows, repo_root, shapes_data_dir, tmp_path):
    kept = _downloaded_rows(rows)  # what img2dataset wrote: one epoch of the stream
    empty = sum(r["caption"] is None for r in kept)
    low = sum(r["caption"] is not None and r["similarity"] < 0.3 for r in kept)
    trainable = len(kept) - empty - low
    # Train with a metadata filter alone (captions from the .txt members): 6 steps of 16.
    proc = _vlm_jax(repo_root, "train", "--config", "experiments/clip_tiny.py:test",
                    "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={shapes_data_dir}",
                    "--config.data.name=webdataset",
                    f"--config.data.train_files={out}/{{00000..00002}}.tar",
                    "--config.data.filters.metadata=similarity >= 0.3",
                    "--config.data.max_skipped_fraction=0.9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [{k: v for k, v in r.items() if k.startswith("data/")} for r in logged
            if "data/skipped" in r][-1]
    print("train data/ metrics:", last, f"(per epoch: {low} below 0.3, {empty} empty)")
    assert set(last) == {"data/skipped", "data/skipped/empty_caption",
                         "data/skipped/metadata:similarity"}
    # The run reads the shuffled stream (one epoch = what img2dataset wrote) over several
    # epochs: the 96 samples it trained on span at least 96 // trainable whole epochs, each of
    # which skips `low` and `empty` samples; grain reads ahead by at most its prefetch buffer
    # (64 positions) and a batch beyond the last sample taken.
    whole = 6 * 16 // trainable
    most = whole + 1 + -(-(64 + 16) // len(kept))
    assert whole * low <= last["data/skipped/metadata:similarity"] <= most * low
    assert whole * empty <= last["data/skipped/empty_caption"] <= most * empty
    assert last["data/skipped"] == (last["data/skipped/empty_caption"]
                                    + last["data/skipped/metadata:similarity"])

    # ArrayRecord: every sample img2dataset wrote (--keep_bad keeps the empty captions, which
    # convert drops by default), with its metadata (the filters still apply at training time).
    proc = _vlm_jax(repo_root, "data", "convert", "--input", f"{out}/*.tar", "--output",
                    str(tmp_path / "ar" / "train"), "--num_shards", "2", "--keep_bad")
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(proc.stdout.strip().splitlines()[-1])
    records = sources.ArrayRecordSource(str(tmp_path / "ar" / "train-*.array_record"))
    assert len(records) == len(kept)
    proc = _vlm_jax(repo_root, "data", "inspect", "--format", "array_record", "--input",
                    str(tmp_path / "ar" / "train-*.array_record"), "--config",
                    "experiments/clip_tiny.py:test", *FILTERS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["samples"] == len(kept)
    assert {k: v for k, v in report.items() if k == "seen" or k.startswith("skipped/")
            or k == "skipped"} == _want_counts(rows)
