"""Per-example grain transforms: decode, resize, tokenise, select features.

A raw example is a dict as read from a TFDS data source (``image`` as PNG/JPEG bytes or a
uint8 array, ``caption`` as bytes or str, ``label`` as int); :func:`example_transforms`
chains the transforms that turn it into ``{'image': uint8 [S, S, 3], 'text': int32 [L],
'label': int32}``. Pixels stay uint8 in every pipeline: the model normalises them on the device
(:func:`vlm_jax.models.layers.normalize_pixels`, the one place of the CLIP pixel statistics),
and a batch is 4x fewer bytes to stack, copy and transfer than float32. All transforms are
picklable, so they run in grain worker processes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from input_pipeline import DataError
from input_pipeline.tokenizers import SentencePieceTokenizer

Example = dict[str, Any]


def to_str(value: bytes | str | np.ndarray) -> str:
    """A text feature as str (TFDS Text features read back as bytes, maybe in a 0-d array)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class DecodeImage(grain.transforms.Map):
    """Decodes ``example[key]`` (PNG/JPEG bytes or an image array) to uint8 [H, W, 3] RGB."""

    def __init__(self, key: str = "image"):
        self.key = key

    def map(self, example: Example) -> Example:
        value = example[self.key]
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
            grey = value.ndim == 3 and value.shape[-1] == 1
            image = Image.fromarray(value[..., 0] if grey else value)
        else:
            data = value.item() if isinstance(value, np.ndarray) else value
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except Exception as e:  # PIL raises several types for corrupt data
                raise DataError(
                    f"Cannot decode feature {self.key!r} as an image ({type(e).__name__}: {e}); "
                    "expected PNG/JPEG bytes or a uint8 array. Rebuild the dataset if it is "
                    "corrupt."
                ) from e
        if image.mode != "RGB":
            image = image.convert("RGB")
        return {**example, self.key: np.asarray(image, dtype=np.uint8)}


class ResizeCenterCrop(grain.transforms.Map):
    """Resizes the shorter side of a uint8 image to ``size`` (bicubic), then centre-crops.

    The arithmetic is torchvision's ``Resize(size)`` + ``CenterCrop(size)``, open_clip's and
    OpenAI CLIP's evaluation transform: the long side becomes ``int(size * long / short)`` and
    the crop starts at ``int(round((side - size) / 2))``, so the same pixels are kept. Images
    already ``size x size`` pass through unchanged.
    """

    def __init__(self, size: int, key: str = "image"):
        self.size = size
        self.key = key

    def map(self, example: Example) -> Example:
        image = example[self.key]
        h, w = image.shape[:2]
        if h == w == self.size:
            return example
        short, long = min(h, w), max(h, w)
        new_long = max(self.size, int(self.size * long / short))
        nh, nw = (self.size, new_long) if h <= w else (new_long, self.size)
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        return {**example,
                self.key: resized[top:top + self.size, left:left + self.size]}


class Tokenize(grain.transforms.Map):
    """``example[key]`` (one caption) -> ``example[out_key]`` int32 [context_length]."""

    def __init__(self, tokenizer: SentencePieceTokenizer, key: str = "caption",
                 out_key: str = "text"):
        self.tokenizer = tokenizer
        self.key = key
        self.out_key = out_key

    def map(self, example: Example) -> Example:
        tokens = self.tokenizer.encode([to_str(example[self.key])])[0]
        return {**example, self.out_key: tokens}


class SelectFeatures(grain.transforms.Map):
    """Keeps only the given features, converted to the given dtypes (drops string fields)."""

    def __init__(self, dtypes: Mapping[str, Any]):
        self.dtypes = dict(dtypes)

    def map(self, example: Example) -> Example:
        missing = sorted(set(self.dtypes) - set(example))
        if missing:
            raise DataError(f"Example has no feature(s) {missing}; it has {sorted(example)}.")
        return {k: np.asarray(example[k], dtype) for k, dtype in self.dtypes.items()}


# Features and dtypes of a model-ready example (pixels normalised on the device).
MODEL_FEATURES: dict[str, Any] = {"image": np.uint8, "text": np.int32, "label": np.int32}


def example_transforms(tokenizer: SentencePieceTokenizer,
                       image_size: int | None = None) -> list[grain.transforms.Map]:
    """Transforms from a raw example to ``{'image', 'text', 'label'}`` (see module doc).

    Args:
        tokenizer: tokenizer of the captions.
        image_size: if set, images are resized and centre-cropped to this side.
    """
    ops: list[grain.transforms.Map] = [DecodeImage()]
    if image_size is not None:
        ops.append(ResizeCenterCrop(image_size))
    ops += [Tokenize(tokenizer), SelectFeatures(MODEL_FEATURES)]
    return ops


# -------------------------------------------------------------------------------------------
# Image-text pairs from the wild (webdataset / ArrayRecord sources): bad samples are skipped.
# -------------------------------------------------------------------------------------------

SKIP_REASONS = ("missing_image", "missing_caption", "caption_not_utf8", "empty_caption",
                "corrupt_image", "image_too_small", "image_too_large",
                # Documents (input_pipeline.text / the interleaved webdataset documents):
                "missing_text", "text_not_utf8", "empty_text", "bad_json", "no_images",
                # A tar shard (or its rest) that cannot be read, streamed webdataset (counted
                # once per shard, not per sample: input_pipeline.sources.WebDatasetStream).
                "unreadable_shard")
# Images dropped from a document that is kept (its other images and its texts are used), e.g.
# the failed downloads of an OBELICS / MMC4 conversion: counted, not skipped samples.
DROP_REASONS = ("missing_image", "corrupt_image", "image_too_small", "image_too_large")


class SkipStats:
    """Counts of examples read and skipped (by reason) in this process.

    grain worker processes keep their own counts; with ``worker_count=0`` (the default) these
    are the pipeline's. :func:`snapshot` returns ``{'seen': n, 'skipped': m, 'skipped/<reason>':
    k, ...}`` and, for images dropped from kept documents, ``'dropped_images/<reason>': k``.
    """

    def __init__(self):
        self.seen = 0
        self.skipped: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    def record(self, reason: str | None) -> None:
        self.seen += 1
        if reason is not None:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def drop_image(self, reason: str) -> None:
        """Counts an image left out of a document that is kept (:data:`DROP_REASONS`)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def snapshot(self) -> dict[str, int]:
        out = {"seen": self.seen, "skipped": sum(self.skipped.values())}
        out.update({f"skipped/{k}": v for k, v in sorted(self.skipped.items())})
        out.update({f"dropped_images/{k}": v for k, v in sorted(self.dropped.items())})
        return out

    def reset(self) -> None:
        self.seen, self.skipped, self.dropped = 0, {}, {}


SKIP_STATS = SkipStats()


def check_image(image: bytes | np.ndarray, min_side: int = 8, max_pixels: int = 8192 * 8192
                ) -> tuple[str | None, np.ndarray | None]:
    """``(None, uint8 [H, W, 3] RGB)`` for usable image bytes (or a decoded uint8 array), else
    ``(reason, None)``: ``corrupt_image``, ``image_too_small`` (a side under ``min_side``) or
    ``image_too_large`` (over ``max_pixels``, read from the header before decoding)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:  # already decoded (TFDS)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or min(image.shape[:2]) < min_side:
            return "image_too_small", None
        return None, np.asarray(Image.fromarray(image).convert("RGB"))
    try:
        with Image.open(io.BytesIO(image)) as pil:
            w, h = pil.size
            if w * h > max_pixels:
                return "image_too_large", None
            if min(w, h) < min_side:
                return "image_too_small", None
            pil.load()
            rgb = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError:  # PIL's own guard, raised at open for > 2x its cap
        return "image_too_large", None
    except Exception:  # pylint: disable=broad-except  # PIL raises many types
        return "corrupt_image", None
    return None, rgb


class DecodePair(grain.transforms.Map):
    """A raw record (``image`` bytes, ``caption`` bytes/str) -> ``image`` uint8 [H, W, 3] RGB and
    ``caption`` str, or ``{'_skip': reason, 'key': ...}`` for a sample that cannot be used.

    Reasons (:data:`SKIP_REASONS`): no image or caption member, caption not UTF-8 or blank,
    image bytes that do not decode (truncated, corrupt, not an image), smaller than
    ``min_side`` pixels on a side (1x1 tracking pixels), or more than ``max_pixels`` pixels
    (checked from the header, before decoding, so a 20000x20000 image costs nothing).
    """

    def __init__(self, min_side: int = 8, max_pixels: int = 8192 * 8192):
        self.min_side = min_side
        self.max_pixels = max_pixels

    def _check(self, example: Example) -> tuple[str | None, Any, str]:
        image, caption = example.get("image"), example.get("caption")
        if image is None or (isinstance(image, (bytes, bytearray)) and not image):
            return "missing_image", None, ""
        if caption is None:
            return "missing_caption", None, ""
        if isinstance(caption, (bytes, bytearray)):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                return "caption_not_utf8", None, ""
        caption = " ".join(str(caption).split())
        if not caption:
            return "empty_caption", None, ""
        reason, rgb = check_image(image, self.min_side, self.max_pixels)
        return reason, rgb, caption

    def map(self, example: Example) -> Example:
        reason, image, caption = self._check(example)
        SKIP_STATS.record(reason)
        if reason is not None:
            return {"_skip": reason, "key": example.get("key", "")}
        return {"image": image, "caption": caption, "label": -1, "key": example.get("key", "")}


class RandomResizedCrop(grain.transforms.RandomMap):
    """Training augmentation of open_clip (``RandomResizedCrop(scale=(0.9, 1.0))``, bicubic):
    a crop of ``scale`` of the area and aspect ratio in ``ratio`` (log-uniform), resized to
    ``size x size``; after 10 failed draws, the central square crop. Written here rather than
    taken from torchvision to avoid a torch dependency; grain seeds ``rng`` per element, so the
    crops are reproducible and survive resumption."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), key: str = "image"):
        self.size, self.scale, self.ratio, self.key = size, scale, ratio, key

    def random_map(self, example: Example, rng: np.random.Generator) -> Example:
        image = example[self.key]
        h, w = image.shape[:2]
        box = None
        for _ in range(10):
            area = h * w * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                box = (left, top, left + cw, top + ch)
                break
        if box is None:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            box = (left, top, left + side, top + side)
        crop = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BICUBIC,
                                             box=box)
        return {**example, self.key: np.asarray(crop)}


class KeepValid(grain.transforms.Filter):
    """Drops the examples :class:`DecodePair` marked with ``_skip``."""

    def filter(self, example: Example) -> bool:
        return "_skip" not in example


def pair_transforms(tokenizer, image_size: int, min_side: int = 8,
                    max_pixels: int = 8192 * 8192, train: bool = True,
                    crop_scale: tuple[float, float] = (0.9, 1.0)) -> list:
    """Transforms from a raw image-text record to ``{'image' uint8, 'text', 'label'}`` (label
    -1), skipping bad samples (counted in :data:`SKIP_STATS`): random-resized crop for training,
    resize + centre crop otherwise; tokenisation. Pixels stay uint8 (normalised on device)."""
    crop = (RandomResizedCrop(image_size, crop_scale) if train else
            ResizeCenterCrop(image_size))
    return [DecodePair(min_side, max_pixels), KeepValid(), crop, Tokenize(tokenizer),
            SelectFeatures(PAIR_FEATURES)]


# Raw-pair batches keep uint8 pixels: the model normalises them on the device
# (vlm_jax.models.layers.normalize_pixels), 4x fewer bytes to copy and transfer than float32.
PAIR_FEATURES: dict[str, Any] = {"image": np.uint8, "text": np.int32, "label": np.int32}
