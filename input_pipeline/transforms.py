"""Per-example grain transforms: decode, resize, normalise, tokenise, select features.

A raw example is a dict as read from a TFDS data source (``image`` as PNG/JPEG bytes or a
uint8 array, ``caption`` as bytes or str, ``label`` as int); :func:`example_transforms`
chains the transforms that turn it into ``{'image': float32 [S, S, 3], 'text': int32 [L],
'label': int32}``. All transforms are picklable, so they run in grain worker processes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from input_pipeline import DataError
from input_pipeline.tokenizers import SentencePieceTokenizer

# OpenAI CLIP pixel statistics (RGB, on [0, 1] values), as open_clip uses them.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

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

    Images already ``size x size`` pass through unchanged.
    """

    def __init__(self, size: int, key: str = "image"):
        self.size = size
        self.key = key

    def map(self, example: Example) -> Example:
        image = example[self.key]
        h, w = image.shape[:2]
        if h == w == self.size:
            return example
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        return {**example,
                self.key: resized[top:top + self.size, left:left + self.size]}


class Normalize(grain.transforms.Map):
    """uint8 image -> float32 ``(x / 255 - mean) / std`` per channel (CLIP statistics)."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 key: str = "image"):
        self.mean = np.asarray(mean, np.float32) * 255
        self.inv_std = 1 / (np.asarray(std, np.float32) * 255)
        self.key = key

    def map(self, example: Example) -> Example:
        image = example[self.key].astype(np.float32)
        return {**example, self.key: (image - self.mean) * self.inv_std}


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


# Features and dtypes of a model-ready example.
MODEL_FEATURES: dict[str, Any] = {"image": np.float32, "text": np.int32, "label": np.int32}


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
    ops += [Normalize(), Tokenize(tokenizer), SelectFeatures(MODEL_FEATURES)]
    return ops
