"""``vlm-jax caption``: captions for a folder of images from a captioning model's checkpoint.

    vlm-jax caption --workdir runs/coca_tiny --images photos/ [--method beam --beam_size 3]

Writes ``<workdir>/captions.jsonl`` (or ``--output``): one ``{"image", "caption"}`` line per
image, in file-name order; unreadable images are reported and skipped, never fatal.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from etils import epath
from PIL import Image

from input_pipeline import DataError
from input_pipeline.transforms import ResizeCenterCrop

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_images(folder: str | os.PathLike, size: int) -> tuple[list[str], np.ndarray,
                                                                 list[tuple[str, str]]]:
    """The images of ``folder`` as uint8 ``[N, size, size, 3]`` (short side resized, centre
    crop), their file names, and ``(file, reason)`` for each file that could not be read."""
    folder = epath.Path(folder)  # Local or gs://.
    if not folder.is_dir():
        raise DataError(f"--images {folder}: not a directory; pass a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    names, arrays, bad = [], [], []
    crop = ResizeCenterCrop(size)
    for path in files:
        try:
            with Image.open(io.BytesIO(path.read_bytes())) as im:
                pixels = np.asarray(im.convert("RGB"))
        except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
            bad.append((path.name, f"{type(e).__name__}: {e}"))
            continue
        names.append(path.name)
        arrays.append(crop.map({"image": pixels})["image"])
    if not arrays:
        raise DataError(f"--images {folder}: no readable image ({', '.join(IMAGE_SUFFIXES)}) "
                        f"among {len(files)} file(s)" + (f"; e.g. {bad[0][0]}: {bad[0][1]}"
                                                         if bad else "") + ".")
    return names, np.stack(arrays), bad


def caption_folder(config, workdir: str, images: str, *, step: int | None = None,
                   output: str | None = None, options: dict | None = None) -> epath.Path:
    """Captions every image of ``images`` with the (latest or ``step``) checkpoint of
    ``workdir``; ``options``: ``method`` and the options of :func:`vlm_jax.decoding.generate`
    (default: the options of the config's captioning entry in ``config.evals``). Returns the
    JSONL file written."""
    from vlm_jax import evaluation, train  # pylint: disable=import-outside-toplevel
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
    from vlm_jax.evaluators.common import FeatureExtractor  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import FAMILIES, get_family  # pylint: disable=import-outside-toplevel

    family = get_family(config)
    if "caption" not in family.capabilities:
        captioners = sorted(f.name for f in FAMILIES.values() if "caption" in f.capabilities)
        raise ConfigError(f"{workdir} holds a {family.name!r} model, which has no captioning "
                          f"decoder; captions need a model of a family with one ({captioners}, "
                          "e.g. experiments/coca_tiny_shapes.py).")
    names, pixels, bad = read_images(images, family.image_size(config))
    for name, reason in bad:
        print(f"Skipped {name}: {reason}")
    s, params, step = train.restore_for_inference(config, workdir, step)
    tokenizer = family.tokenizer(config, workdir)  # No dataset is built or opened.
    opts = dict(evaluation.caption_options(config) if options is None else options)
    extractor = FeatureExtractor(s.graphdef, params, s.param_shardings, s.mesh, s.rules,
                                 config.eval.batch_size, tokenizer=tokenizer,
                                 caption_options=opts)
    captions = extractor.captions(pixels)
    out = epath.Path(output) if output else epath.Path(workdir) / "captions.jsonl"
    lines = []
    for name, caption in zip(names, captions):
        lines.append(json.dumps({"image": name, "caption": caption}) + "\n")
        print(f"{name}: {caption}")
    out.write_text("".join(lines), encoding="utf-8")  # One object write: gs:// has no append.
    print(f"Wrote {len(captions)} captions (step {step}, {opts.get('method', 'greedy')}) to "
          f"{out}" + (f"; skipped {len(bad)} unreadable file(s)." if bad else "."))
    return out
