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

import ast
import dataclasses
import io
import json
import re
from collections.abc import Mapping, Sequence
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


class ResizeSquash(grain.transforms.Map):
    """Resizes a uint8 image to ``size x size`` (bicubic), aspect ratio not kept: open_clip's
    ``resize_mode='squash'`` evaluation transform (torchvision ``Resize((size, size))``)."""

    def __init__(self, size: int, key: str = "image"):
        self.size = size
        self.key = key

    def map(self, example: Example) -> Example:
        image = example[self.key]
        if image.shape[:2] == (self.size, self.size):
            return example
        resized = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BICUBIC)
        return {**example, self.key: np.asarray(resized)}


RESIZE_MODES = {"shortest": ResizeCenterCrop, "squash": ResizeSquash}


def eval_resize(size: int, mode: str = "shortest", key: str = "image") -> grain.transforms.Map:
    """The evaluation resize of ``config.eval.resize_mode``: ``'shortest'`` (short side, centre
    crop: OpenAI's and open_clip's default) or ``'squash'``."""
    if mode not in RESIZE_MODES:
        raise DataError(f"resize_mode={mode!r}: use one of {sorted(RESIZE_MODES)} "
                        "(config.eval.resize_mode).")
    return RESIZE_MODES[mode](size, key)


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


# Cached image embeddings (`vlm-jax data embed`, LiT with a locked image tower): a record holds
# the locked tower's embedding instead of the image; the step is then text-only.
EMBEDDING_FEATURES: dict[str, Any] = {"image_emb": np.float32, "text": np.int32}


class DecodeEmbedding(grain.transforms.Map):
    """``example['image_emb']`` (the little-endian float32 bytes ``vlm-jax data embed`` stores)
    -> float32 ``[dim]``."""

    def __init__(self, dim: int, key: str = "image_emb"):
        self.dim = dim
        self.key = key

    def map(self, example: Example) -> Example:
        raw = example.get(self.key)
        if raw is None:
            raise DataError(f"Record {example.get('key')!r} has no {self.key!r}: not written by "
                            "`vlm-jax data embed`.")
        value = np.frombuffer(raw, dtype="<f4")
        if value.shape != (self.dim,):
            raise DataError(f"Record {example.get('key')!r}: {self.key} has {value.size} values, "
                            f"the model's embed_dim is {self.dim}; recompute the embeddings "
                            "with `vlm-jax data embed` for this model.")
        return {**example, self.key: value.astype(np.float32)}


def embedding_transforms(tokenizer: SentencePieceTokenizer, dim: int) -> list[grain.transforms.Map]:
    """Transforms from a cached-embedding record to ``{'image_emb' float32 [dim], 'text' int32
    [L]}`` (the caption tokenised here, as the image-text pipelines do)."""
    return [DecodeEmbedding(dim), Tokenize(tokenizer), SelectFeatures(EMBEDDING_FEATURES)]


def example_transforms(tokenizer: SentencePieceTokenizer,
                       image_size: int | None = None,
                       keep: Mapping[str, Any] | None = None) -> list[grain.transforms.Map]:
    """Transforms from a raw example to ``{'image', 'text', 'label'}`` (see module doc).

    Args:
        tokenizer: tokenizer of the captions.
        image_size: if set, images are resized and centre-cropped to this side.
        keep: further features to keep, with their dtypes (e.g. LocCa's decoder targets,
            :data:`input_pipeline.locca.OUTPUTS`).
    """
    ops: list[grain.transforms.Map] = [DecodeImage()]
    if image_size is not None:
        ops.append(ResizeCenterCrop(image_size))
    ops += [Tokenize(tokenizer), SelectFeatures({**MODEL_FEATURES, **dict(keep or {})})]
    return ops


# -------------------------------------------------------------------------------------------
# Image-text pairs from the wild (webdataset / ArrayRecord sources): bad samples are skipped.
# -------------------------------------------------------------------------------------------

SKIP_REASONS = ("missing_image", "missing_caption", "caption_not_utf8", "empty_caption",
                "corrupt_image", "image_too_small", "image_too_large",
                # Sample filters (SampleFilters, config.data.filters); a metadata predicate adds
                # 'metadata:<field>' and 'metadata_missing:<field>' (SkipStats.declare).
                "extreme_aspect_ratio", "caption_too_short", "caption_too_long",
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
        # Reasons beyond SKIP_REASONS that a pipeline of this process can produce (those of
        # metadata predicates, named after their fields): the keys of the counts summed over
        # processes must be known in advance and the same on every process.
        self.declared: set[str] = set()

    def declare(self, reasons: Sequence[str]) -> None:
        """Registers skip reasons that are not in :data:`SKIP_REASONS` (kept across resets)."""
        self.declared.update(r for r in reasons if r not in SKIP_REASONS)

    def reasons(self) -> tuple[str, ...]:
        """Every skip reason this process can count: :data:`SKIP_REASONS`, then the declared
        ones, sorted (the same order on every process that built the same pipeline)."""
        return SKIP_REASONS + tuple(sorted(self.declared))

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


def _aspect_ratio_exceeds(w: int, h: int, max_aspect_ratio: float) -> bool:
    """Whether long side / short side > ``max_aspect_ratio`` (0: no limit)."""
    return bool(max_aspect_ratio) and max(w, h) > max_aspect_ratio * min(w, h)


def check_image(image: bytes | np.ndarray, min_side: int = 8, max_pixels: int = 8192 * 8192,
                max_aspect_ratio: float = 0.0) -> tuple[str | None, np.ndarray | None]:
    """``(None, uint8 [H, W, 3] RGB)`` for usable image bytes (or a decoded uint8 array), else
    ``(reason, None)``: ``corrupt_image``, ``image_too_small`` (a side under ``min_side``),
    ``image_too_large`` (over ``max_pixels``) or ``extreme_aspect_ratio`` (long side over
    ``max_aspect_ratio`` times the short side; 0: no limit), the last three read from the
    header before decoding."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:  # already decoded (TFDS)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or min(image.shape[:2]) < min_side:
            return "image_too_small", None
        if _aspect_ratio_exceeds(image.shape[1], image.shape[0], max_aspect_ratio):
            return "extreme_aspect_ratio", None
        return None, np.asarray(Image.fromarray(image).convert("RGB"))
    try:
        with Image.open(io.BytesIO(image)) as pil:
            w, h = pil.size
            if w * h > max_pixels:
                return "image_too_large", None
            if min(w, h) < min_side:
                return "image_too_small", None
            if _aspect_ratio_exceeds(w, h, max_aspect_ratio):
                return "extreme_aspect_ratio", None
            pil.load()
            rgb = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError:  # PIL's own guard, raised at open for > 2x its cap
        return "image_too_large", None
    except Exception:  # pylint: disable=broad-except  # PIL raises many types
        return "corrupt_image", None
    return None, rgb


# Sample filters (config.data.filters): caption length, aspect ratio, and predicates on the
# ``.json`` metadata img2dataset writes next to each sample (LAION's ``similarity``, ``NSFW``,
# ``punsafe``; DataComp's ``clip_l14_similarity_score``; img2dataset's ``width`` / ``height``).

# ``field op literal``. A field is a JSON key (dots walk into nested objects); ``in`` / ``not
# in`` need whitespace around them, so a field such as ``origin`` is not read as ``orig in``;
# the operator is an atomic group, so ``x >= `` is not read as ``x > '='``.
_PREDICATE = re.compile(
    r"^\s*(?P<field>[A-Za-z_][\w.]*)\s*"
    r"(?P<op>(?>==|!=|<=|>=|<|>|(?<=\s)not\s+in(?=[\s\[({'\"])|(?<=\s)in(?=[\s\[({'\"])))"
    r"\s*(?P<literal>\S.*?)\s*$")
_ORDER_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
              ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
MISSING_FIELD = object()  # MetadataPredicate.lookup of a field the metadata lacks


@dataclasses.dataclass(frozen=True)
class MetadataPredicate:
    """One condition ``field op literal`` on a sample's ``.json`` metadata, e.g.
    ``similarity >= 0.28``, ``NSFW != 'UNSURE'``, ``NSFW in ['UNLIKELY', 'NSFW']``.

    Built by :meth:`parse` (the literal is read with :func:`ast.literal_eval`, never ``eval``).
    :meth:`check` gives the skip reason of a metadata dict: ``metadata_missing:<field>`` when the
    field is absent or null, ``metadata:<field>`` when the value fails the condition (a value
    that cannot be compared with the literal fails it). A string value compared with a number
    is read as a number first: img2dataset copies the columns of a CSV input as strings.
    """

    text: str
    field: str
    op: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> "MetadataPredicate":
        """Parses ``'field op literal'`` (ops ``== != < <= > >= in``, ``not in``).

        Raises:
            ValueError: naming the predicate and what is wrong with it.
        """
        if not isinstance(text, str):
            raise ValueError(f"Metadata predicate {text!r} is not a string; write e.g. "
                             "'similarity >= 0.28'.")
        m = _PREDICATE.match(text)
        if m is None:
            raise ValueError(
                f"Metadata predicate {text!r} is not of the form 'field op literal' with op one "
                "of == != < <= > >= in 'not in' (e.g. \"similarity >= 0.28\", "
                "\"NSFW != 'UNSURE'\", \"NSFW in ['UNLIKELY']\").")
        field, op = m.group("field"), " ".join(m.group("op").split())
        try:
            value = ast.literal_eval(m.group("literal"))
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"Metadata predicate {text!r}: {m.group('literal')!r} is not a "
                             "Python literal (a number, a quoted string, True/False/None or a "
                             "list of them).") from e
        if value is None:
            raise ValueError(f"Metadata predicate {text!r}: a null field counts as missing "
                             f"(skipped as metadata_missing:{field}); compare with a value.")
        if op in _ORDER_OPS and (isinstance(value, bool)
                                 or not isinstance(value, (int, float, str))):
            raise ValueError(f"Metadata predicate {text!r}: {op} needs a number or a string, "
                             f"not {value!r}.")
        if op in ("in", "not in") and not isinstance(value, (list, tuple, set, frozenset, str)):
            raise ValueError(f"Metadata predicate {text!r}: {op} needs a list, e.g. "
                             f"{field} {op} ['a', 'b'].")
        if isinstance(value, (list, set)):
            value = tuple(value)
        return cls(text=text.strip(), field=field, op=op, value=value)

    def lookup(self, metadata: Mapping[str, Any]) -> Any:
        """The field's value (the whole dotted name as a key, else a path), or a sentinel."""
        if self.field in metadata:
            return metadata[self.field]
        node: Any = metadata
        for part in self.field.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return MISSING_FIELD
            node = node[part]
        return node

    def check(self, metadata: Mapping[str, Any]) -> str | None:
        """``None`` when ``metadata`` satisfies the predicate, else the skip reason."""
        value = self.lookup(metadata)
        if value is MISSING_FIELD or value is None:
            return f"metadata_missing:{self.field}"
        literal = self.value
        if isinstance(value, str) and isinstance(literal, (int, float)) and not isinstance(
                literal, bool):
            try:
                value = float(value)
            except ValueError:
                return f"metadata:{self.field}"
        try:
            if self.op in _ORDER_OPS:
                if isinstance(value, bool) or isinstance(value, str) != isinstance(literal, str):
                    ok = False
                else:
                    ok = bool(_ORDER_OPS[self.op](value, literal))
            elif self.op == "==":
                ok = value == literal
            elif self.op == "!=":
                ok = value != literal
            else:
                ok = (value in literal) == (self.op == "in")
        except TypeError:  # e.g. a list value in a string literal
            ok = False
        return None if ok else f"metadata:{self.field}"


@dataclasses.dataclass(frozen=True)
class SampleFilters:
    """What :class:`DecodePair` drops beyond unusable samples (``config.data.filters``).

    Lengths are those of the caption with whitespace runs collapsed (what is tokenised):
    characters, and words split on whitespace. 0 means no limit, everywhere.

    Attributes:
        max_aspect_ratio: the long side over the short side, at most (e.g. 3.0); from the
            image header, before decoding (``extreme_aspect_ratio``).
        min_caption_chars / max_caption_chars: ``caption_too_short`` / ``caption_too_long``.
        min_caption_words / max_caption_words: the same, in words.
        metadata: :class:`MetadataPredicate` s that must all hold on the ``.json`` metadata.
    """

    max_aspect_ratio: float = 0.0
    min_caption_chars: int = 0
    max_caption_chars: int = 0
    min_caption_words: int = 0
    max_caption_words: int = 0
    metadata: tuple[MetadataPredicate, ...] = ()

    @classmethod
    def create(cls, *, metadata: Sequence[str] = (), **limits: Any) -> "SampleFilters":
        """From config values: ``metadata`` as predicate strings, the limits as numbers.

        Raises:
            ValueError: an unknown key, a negative limit, a max below its min, an aspect ratio
                in (0, 1), or a predicate that does not parse (named).
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"metadata"}
        unknown = sorted(set(limits) - names)
        if unknown:
            raise ValueError(f"Unknown sample filter(s) {unknown}; the filters are "
                             f"{sorted(names | {'metadata'})}.")
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Sample filter {name}={value!r} must be a number >= 0 "
                                 "(0: no limit).")
        if 0 < limits.get("max_aspect_ratio", 0) < 1:
            raise ValueError(f"Sample filter max_aspect_ratio={limits['max_aspect_ratio']} is "
                             "long side / short side, so at least 1 (0: no limit).")
        for unit in ("chars", "words"):
            lo, hi = limits.get(f"min_caption_{unit}", 0), limits.get(f"max_caption_{unit}", 0)
            if hi and lo > hi:
                raise ValueError(f"Sample filters min_caption_{unit}={lo} > "
                                 f"max_caption_{unit}={hi}: no caption would pass.")
        if isinstance(metadata, str):
            metadata = [metadata]
        predicates = tuple(MetadataPredicate.parse(p) for p in metadata)
        ints = {k: int(v) for k, v in limits.items() if k != "max_aspect_ratio"}
        return cls(max_aspect_ratio=float(limits.get("max_aspect_ratio", 0.0)),
                   metadata=predicates, **ints)

    @property
    def active(self) -> bool:
        """Whether any filter is set."""
        return self != SampleFilters()

    def reasons(self) -> tuple[str, ...]:
        """The skip reasons beyond :data:`SKIP_REASONS` these filters can give."""
        out: list[str] = []
        for p in self.metadata:
            out += [f"metadata_missing:{p.field}", f"metadata:{p.field}"]
        return tuple(dict.fromkeys(out))

    def check_caption(self, caption: str) -> str | None:
        """``caption_too_short`` / ``caption_too_long`` / None for a whitespace-collapsed
        caption."""
        chars = len(caption)
        words = len(caption.split()) if self.min_caption_words or self.max_caption_words else 0
        if chars < self.min_caption_chars or words < self.min_caption_words:
            return "caption_too_short"
        if ((self.max_caption_chars and chars > self.max_caption_chars)
                or (self.max_caption_words and words > self.max_caption_words)):
            return "caption_too_long"
        return None

    def check_metadata(self, metadata: bytes | str | Mapping | None) -> str | None:
        """The first failing predicate's reason, ``bad_json`` for metadata that is not a JSON
        object, or None. A sample without metadata lacks every field."""
        if not self.metadata:
            return None
        if metadata is None:
            meta: Mapping[str, Any] = {}
        elif isinstance(metadata, Mapping):
            meta = metadata
        else:
            try:
                meta = json.loads(metadata)
            except (ValueError, UnicodeDecodeError):
                return "bad_json"
            if not isinstance(meta, dict):
                return "bad_json"
        for predicate in self.metadata:
            reason = predicate.check(meta)
            if reason is not None:
                return reason
        return None


NO_FILTERS = SampleFilters()


class DecodePair(grain.transforms.Map):
    """A raw record (``image`` bytes, ``caption`` bytes/str, ``metadata`` JSON bytes) ->
    ``image`` uint8 [H, W, 3] RGB and ``caption`` str, or ``{'_skip': reason, 'key': ...}`` for
    a sample that cannot be used or that ``filters`` (:class:`SampleFilters`) reject.

    Reasons (:data:`SKIP_REASONS`), in the order they are checked, the first that applies
    counted: no image or caption member, caption not UTF-8 or blank, caption shorter or longer
    than the filters allow, a metadata predicate that fails (``metadata:<field>``) or whose field
    is absent (``metadata_missing:<field>``), metadata that is not a JSON object, image bytes
    that do not decode (truncated, corrupt, not an image), smaller than ``min_side`` pixels on a
    side (1x1 tracking pixels), more than ``max_pixels`` pixels, or a long side over
    ``filters.max_aspect_ratio`` times the short side (the last three from the header, before
    decoding, so a 20000x20000 image costs nothing). Captions and metadata are checked first:
    they cost no image decode.
    """

    def __init__(self, min_side: int = 8, max_pixels: int = 8192 * 8192,
                 filters: SampleFilters = NO_FILTERS):
        self.min_side = min_side
        self.max_pixels = max_pixels
        self.filters = filters
        SKIP_STATS.declare(filters.reasons())

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
        reason = (self.filters.check_caption(caption)
                  or self.filters.check_metadata(example.get("metadata")))
        if reason is not None:
            return reason, None, ""
        reason, rgb = check_image(image, self.min_side, self.max_pixels,
                                  self.filters.max_aspect_ratio)
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
                    crop_scale: tuple[float, float] = (0.9, 1.0),
                    filters: SampleFilters = NO_FILTERS) -> list:
    """Transforms from a raw image-text record to ``{'image' uint8, 'text', 'label'}`` (label
    -1), skipping bad samples and those ``filters`` reject (counted in :data:`SKIP_STATS`):
    random-resized crop for training, resize + centre crop otherwise; tokenisation. Pixels stay
    uint8 (normalised on device)."""
    crop = (RandomResizedCrop(image_size, crop_scale) if train else
            ResizeCenterCrop(image_size))
    return [DecodePair(min_side, max_pixels, filters), KeepValid(), crop, Tokenize(tokenizer),
            SelectFeatures(PAIR_FEATURES)]


# Raw-pair batches keep uint8 pixels: the model normalises them on the device
# (vlm_jax.models.layers.normalize_pixels), 4x fewer bytes to copy and transfer than float32.
PAIR_FEATURES: dict[str, Any] = {"image": np.uint8, "text": np.int32, "label": np.int32}
