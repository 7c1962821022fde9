"""Synthetic webdataset tar shards for the data benchmarks: smooth random JPEGs (they compress
like photos; noise would not) with captions, optionally img2dataset-style ``.json`` metadata and
a fraction of bad samples. One writer for every benchmark, so their inputs are comparable."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image


def write_shards(root: str, n: int, shards: int, *, sides: tuple[int, int] = (256, 640),
                 block: int = 32, caption: str = "a photo of object number {i} on a table",
                 metadata: bool = False, bad_fraction: float = 0.0) -> list[str]:
    """``shards`` tar shards ``root/bench-NNNNN.tar`` holding ``n`` samples in all
    (``<key>.jpg``, ``<key>.txt``, with ``metadata`` also ``<key>.json``), image sides drawn in
    ``sides``, seeded (the same files on every call). With ``bad_fraction``, that fraction of
    the samples loses its caption or has its JPEG cut in half. Returns the shard paths."""
    rng = np.random.default_rng(0)
    paths, per = [], -(-n // shards)
    for s in range(shards):
        path = os.path.join(root, f"bench-{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                w, h = (int(x) for x in rng.integers(sides[0], sides[1] + 1, size=2))
                small = rng.integers(0, 255, (h // block + 1, w // block + 1, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                members = {"jpg": buf.getvalue(), "txt": caption.format(i=i).encode()}
                if metadata:
                    members["json"] = f'{{"key": "{i:08d}", "width": {w}, "height": {h}}}'.encode()
                if bad_fraction and rng.random() < bad_fraction:
                    if rng.random() < 0.5:
                        del members["txt"]
                    else:
                        members["jpg"] = members["jpg"][: len(members["jpg"]) // 2]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
