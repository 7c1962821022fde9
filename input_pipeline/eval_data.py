"""Evaluation splits of prepared TFDS datasets: zero-shot classification and image-text retrieval.

Any TFDS dataset prepared in the ArrayRecord file format is read by random access, as
``tfds.data_source`` reads it but from the prepared files alone (no tensorflow, no dataset
generation code needed), loaded into memory in record order and preprocessed as
for evaluation: decode, resize the shorter side to ``image_size`` (bicubic), centre crop, CLIP
normalisation (:mod:`input_pipeline.transforms`, the transforms :mod:`input_pipeline.pipeline`
uses for its eval splits).

* :func:`load_tfds_classification`: ``imagenet2012``, ``cifar10``, ``cifar100``, ... with the
  class names and prompt templates of OpenAI's CLIP evaluation where
  :mod:`vlm_jax.evaluators.metadata` has them (:data:`TFDS_TO_METADATA`), so zero-shot accuracy
  is comparable with published numbers.
* :func:`load_tfds_retrieval`: COCO / Flickr30k-style data with several captions per image
  (TFDS ``coco_captions``: ``captions/text``), flattened for recall@k
  (:mod:`vlm_jax.evaluators.retrieval`).

Nothing is downloaded or built here: a dataset missing from ``data_dir`` raises
:class:`input_pipeline.DataError` with the command that prepares it. Preparing a dataset with
TFDS (``tfds build``) needs tensorflow (``pip install tensorflow-cpu``); reading it does not.

Memory: the images are kept as uint8 pixels, ``N * S * S * 3`` bytes (the 50k ImageNet
validation images at 224 px take 7.5 GB; float32 would take 30 GB); the models normalise uint8
input on the device (:func:`vlm_jax.models.layers.normalize_pixels`). Pass ``max_examples``
or a split slice (``validation[:10%]``) to load less.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import DataError, pipeline, shapes, sources
from input_pipeline.transforms import DecodeImage, eval_resize, to_str

log = logging.getLogger(__name__)

# TFDS dataset name -> dataset of vlm_jax.evaluators.metadata whose class names (in the same
# label order) and templates it uses. ImageNet variants that keep the 1000 ImageNet-1k labels in
# their order share imagenet1k's.
TFDS_TO_METADATA: dict[str, str] = {
    "imagenet2012": "imagenet1k",
    "imagenet_v2": "imagenet1k",
    "imagenet_sketch": "imagenet1k",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    # CLIP_benchmark's names for the VTAB copies it reads from TFDS (so in TFDS label order).
    "caltech101": "caltech101_vtab",
    "eurosat": "eurosat",
    "oxford_iiit_pet": "pets",
    "patch_camelyon": "pcam",
    "svhn_cropped": "svhn",
    "mnist": "mnist",
}
# TFDS dataset -> dataset of vlm_jax.evaluators.metadata whose templates it uses with its own
# TFDS label names, as CLIP_benchmark does for these.
TFDS_TO_TEMPLATES: dict[str, str] = {
    "dtd": "dtd",
    "food101": "food101",
    "oxford_flowers102": "flowers",
    "resisc45": "resisc45",
    "cars196": "cars",
}


class Tokenizer(Protocol):
    """What :func:`load_tfds_retrieval` needs of a tokenizer."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), L]."""


def _base_name(name: str) -> str:
    """``'coco_captions/2014:1.1.0'`` -> ``'coco_captions'``."""
    return name.split(":", 1)[0].split("/", 1)[0]


def _prepared_variants(data_dir: str, base: str) -> list[str]:
    """Variants of ``base`` prepared under ``data_dir``, as ``name[/config]:version``."""
    root = epath.Path(data_dir) / base
    found = []
    for pattern in ("*/dataset_info.json", "*/*/dataset_info.json"):
        for info in sorted(root.glob(pattern)) if root.exists() else []:
            parts = info.parent.relative_to(root).parts
            config = f"/{parts[0]}" if len(parts) == 2 else ""
            found.append(f"{base}{config}:{parts[-1]}")
    return found


def _prepare_hint(name: str, builder_cls: type, data_dir: str) -> str:
    """How to prepare ``name`` into ``data_dir`` (``tfds build``, after a manual download)."""
    if _base_name(name) == shapes.Shapes.name:
        return (f"Build it with input_pipeline.shapes.prepare(data_dir={data_dir!r}, "
                "config=<'64px' or '32px'>) and pass name='shapes/<config>'.")
    build = (f"`tfds build {name} --data_dir {data_dir} --file_format=array_record` "
             "(building needs tensorflow: `pip install tensorflow-cpu`)")
    manual = " ".join((getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or "").split())
    if manual:
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        return (f"{name} needs a manual download first: {manual} Put the files in {manual_dir}/, "
                f"then run {build}.")
    return f"Prepare it with {build}."


def open_builder(name: str, splits: Sequence[str], data_dir: str | os.PathLike | None,
                 image_key: str = "image") -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset, from its metadata files alone: nothing is decoded.

    The builder is restored from the prepared files (``dataset_info.json``, ``features.json``),
    the newest version there unless ``name`` pins one; this is ``tfds.data_source`` without
    instantiating the dataset's generation code, which for some datasets (``coco_captions``)
    imports tensorflow. Its ``info.features`` and ``info.splits`` say what the loaders below
    return, so a run can check its evaluators against them before it reads any example.

    Raises:
        DataError: the dataset is unknown or not prepared in ``data_dir`` (with the command that
            prepares it), lacks one of ``splits`` (TFDS slices such as ``validation[:10%]``
            name their split) or the image feature.
    """
    data_dir = os.fspath(data_dir) if data_dir else shapes.default_data_dir()
    try:
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        try:
            builder_cls = tfds.builder_cls(_base_name(name))
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(
                f"No TFDS dataset {name!r}: it is not a registered TFDS builder and "
                f"{os.path.join(data_dir, _base_name(name))}/ holds no prepared copy. Check the "
                "name (tfds.list_builders()), or point data_dir at the directory that holds it."
            ) from None
        variants = _prepared_variants(data_dir, _base_name(name))
        others = (f" Prepared variants found there: {variants}; pass one of them as the name."
                  if variants else "")
        raise DataError(f"TFDS dataset {name!r} is not prepared in data_dir {data_dir} (no "
                        f"{os.path.join(data_dir, _base_name(name))}/[<config>/]<version>/"
                        f"dataset_info.json).{others} "
                        f"{_prepare_hint(name, builder_cls, data_dir)}") from None
    for split in splits:
        if split.split("[", 1)[0] not in builder.info.splits:  # "validation[:1000]" is valid
            raise DataError(f"TFDS dataset {name!r} in {builder.data_dir} has no split "
                            f"{split!r}; it has {sorted(builder.info.splits)}.")
    if image_key not in builder.info.features:
        raise DataError(f"TFDS dataset {name!r} has no feature {image_key!r}; it has "
                        f"{sorted(builder.info.features)}. Pass image_key=<the image feature>.")
    return builder


def _open(name: str, split: str, data_dir: str | os.PathLike | None,
          image_key: str) -> tuple[Any, tfds.core.DatasetBuilder]:
    """``(random-access source of split, builder)``, or a DataError saying what to do
    (:func:`open_builder`). Images of a ``tfds.features.Image`` feature come back as the encoded
    bytes, decoded later with PIL as RGB (which also converts greyscale and CMYK JPEGs).
    """
    data_dir = os.fspath(data_dir) if data_dir else shapes.default_data_dir()
    sources.check_array_record_gcs(data_dir)  # gs:// records are read by array_record's client
    builder = open_builder(name, [split], data_dir, image_key)
    features = builder.info.features
    decoders = ({image_key: tfds.decode.SkipDecoding()}
                if isinstance(features[image_key], tfds.features.Image) else None)
    try:
        source = builder.as_data_source(split, decoders=decoders)
    except (NotImplementedError, ValueError) as e:  # not in a random-access file format
        raise DataError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format}, not ArrayRecord, so it cannot be read by random "
            f"access ({e}). Rebuild it with `tfds build {name} --data_dir {data_dir} "
            "--file_format=array_record`."
        ) from e
    return source, builder


def _num_examples(source, max_examples: int | None, what: str) -> int:
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples={max_examples}: need at least one example of {what}.")
    n = len(source) if max_examples is None else min(max_examples, len(source))
    if n < 1:
        raise DataError(f"{what} is empty.")
    return n


def _threads(num_threads: int | None) -> int:
    return num_threads or min(8, os.cpu_count() or 1)


def _get(example: dict, path: str, name: str) -> Any:
    """``example['a']['b']`` for ``path='a/b'`` (or ``example['a/b']``: TFDS also has flat
    keys with a slash, such as ``image/id``); a DataError naming the keys if absent."""
    if path in example:
        return example[path]
    value: Any = example
    for i, key in enumerate(path.split("/")):
        if not isinstance(value, dict) or key not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"Examples of {name!r} have no feature {path!r} "
                            f"({'/'.join(path.split('/')[:i]) or 'top level'} has {have}).")
        value = value[key]
    return value


class _ImagePreprocess:
    """Raw image feature (encoded bytes or uint8 array) -> uint8 [S, S, 3] RGB, resized and
    centre-cropped (normalised later, on the device)."""

    def __init__(self, image_size: int, resize_mode: str = "shortest"):
        if image_size < 1:
            raise DataError(f"image_size={image_size} must be a positive number of pixels.")
        self.ops = [DecodeImage("image"), eval_resize(image_size, resize_mode, "image")]

    def __call__(self, value: Any) -> np.ndarray:
        example = {"image": value}
        for op in self.ops:
            example = op.map(example)
        return example["image"]


def _metadata_names_and_templates(name: str, builder: tfds.core.DatasetBuilder,
                                  label_key: str) -> tuple[list[str], tuple[str, ...]]:
    """Class names and templates: :mod:`vlm_jax.evaluators.metadata` for the datasets of
    :data:`TFDS_TO_METADATA`, else the label feature's names (``_`` -> space) with the
    templates of :data:`TFDS_TO_TEMPLATES`' dataset or of :mod:`input_pipeline.pipeline`
    (``'a photo of a {}.'``)."""
    feature = builder.info.features[label_key]
    num_classes = getattr(feature, "num_classes", None)
    meta_name = TFDS_TO_METADATA.get(builder.name)
    if meta_name is not None:
        # Imported here: vlm_jax (and jax/flax with it) is only needed for these datasets.
        from vlm_jax.evaluators import metadata  # pylint: disable=import-outside-toplevel

        names = metadata.class_names(meta_name)
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"Label feature {label_key!r} of {name!r} has {num_classes} classes "
                            f"but the {meta_name!r} class names are {len(names)}; pass the "
                            "label_key of the original labels.")
        return names, metadata.templates(meta_name)
    if not isinstance(feature, tfds.features.ClassLabel) or not feature.names:
        raise DataError(f"Feature {label_key!r} of {name!r} is a {type(feature).__name__} "
                        "without class names, so zero-shot prompts cannot be formed. Pass the "
                        "label_key of a ClassLabel feature, or add the dataset to "
                        "TFDS_TO_METADATA and vlm_jax/evaluators/zeroshot_metadata/.")
    names = [n.replace("_", " ") for n in feature.names]
    if builder.name in TFDS_TO_TEMPLATES:
        from vlm_jax.evaluators import metadata  # pylint: disable=import-outside-toplevel

        return names, metadata.templates(TFDS_TO_TEMPLATES[builder.name])
    # The project's own datasets ("shapes") have their templates in pipeline.py.
    templates = pipeline._TEMPLATES.get(  # pylint: disable=protected-access
        builder.name, pipeline._DEFAULT_TEMPLATES)  # pylint: disable=protected-access
    return names, templates


def _has_feature(features: tfds.features.FeaturesDict, path: str) -> bool:
    """Whether ``path`` (``'a/b'``: nested, through sequences; or a flat key with a slash such
    as ``image/id``) is a feature, as :func:`_get` finds it in an example."""
    if path in features:
        return True
    feature: Any = features
    for key in path.split("/"):
        if isinstance(feature, tfds.features.Sequence):
            feature = feature.feature
        if not isinstance(feature, tfds.features.FeaturesDict) or key not in feature:
            return False
        feature = feature[key]
    return True


def classification_keys(builder: tfds.core.DatasetBuilder, label_key: str = "label") -> set[str]:
    """The keys :func:`load_tfds_classification` returns for a dataset (:func:`open_builder`),
    from its metadata alone: ``image``, and ``label``, ``class_names``, ``templates`` when the
    label feature has class names (its ``ClassLabel`` names or :data:`TFDS_TO_METADATA`'s)."""
    features = builder.info.features
    feature = features[label_key] if label_key in features else None
    named = builder.name in TFDS_TO_METADATA or bool(
        isinstance(feature, tfds.features.ClassLabel) and feature.names)
    return {"image", "label", "class_names", "templates"} if feature and named else {"image"}


def retrieval_keys(builder: tfds.core.DatasetBuilder,
                   caption_key: str = "captions/text") -> set[str]:
    """The keys :func:`load_tfds_retrieval` returns (without a tokenizer) for a dataset
    (:func:`open_builder`), from its metadata alone: ``image``, and ``caption``,
    ``text_to_image`` when it has the captions feature."""
    if _has_feature(builder.info.features, caption_key):
        return {"image", "caption", "text_to_image"}
    return {"image"}


def load_tfds_classification(name: str, *, split: str, data_dir: str | os.PathLike | None,
                             image_size: int, max_examples: int | None = None,
                             resize_mode: str = "shortest",
                             image_key: str = "image", label_key: str = "label",
                             num_threads: int | None = None) -> dict[str, Any]:
    """Loads (the first ``max_examples`` records of) a split of a TFDS image classification
    dataset for zero-shot evaluation, in record order.

    Args:
        name: TFDS name, optionally with config and version (``'imagenet2012'``,
            ``'cifar100'``, ``'shapes/32px'``, ``'cifar10:3.0.2'``).
        split: split to read, e.g. ``'validation'`` (ImageNet) or ``'test'`` (CIFAR); TFDS
            slices such as ``'validation[:10%]'`` work too.
        data_dir: TFDS data directory; None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
        image_size: side S of the centre-cropped images.
        resize_mode: ``'shortest'`` (short side to S, centre crop) or ``'squash'``
            (``config.eval.resize_mode``).
        max_examples: load only the first this many records.
        image_key: the image feature (encoded image or uint8 array).
        label_key: the integer label feature.
        num_threads: decoding threads (default ``min(8, cpu_count)``); the result does not
            depend on it.

    Returns:
        ``{'image': uint8 [N, S, S, 3], 'label': int32 [N],
        'class_names': list[str], 'templates': tuple[str, ...]}``, the layout of
        :func:`input_pipeline.pipeline.load_eval_split`. Names and templates come from
        :mod:`vlm_jax.evaluators.metadata` for the datasets of :data:`TFDS_TO_METADATA`
        (``imagenet2012`` -> OpenAI's 1000 names and 80 templates); otherwise from the TFDS label
        names (``_`` replaced by a space) with the template ``'a photo of a {}.'``.

    Raises:
        DataError: the dataset is unknown, not prepared in ``data_dir`` (the message gives the
            command that prepares it), not in ArrayRecord format, or lacks the split or
            features; or a label is outside the class names.
    """
    source, builder = _open(name, split, data_dir, image_key)
    if label_key not in builder.info.features:
        raise DataError(f"TFDS dataset {name!r} has no feature {label_key!r}; it has "
                        f"{sorted(builder.info.features)}. Pass label_key=<the label feature>.")
    class_names, templates = _metadata_names_and_templates(name, builder, label_key)
    n = _num_examples(source, max_examples, f"split {split!r} of {name!r}")
    preprocess = _ImagePreprocess(image_size, resize_mode)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.empty((n,), np.int32)

    def load(i: int) -> None:
        raw = source[i]
        images[i] = preprocess(raw[image_key])
        labels[i] = int(raw[label_key])

    with concurrent.futures.ThreadPoolExecutor(_threads(num_threads)) as pool:
        list(pool.map(load, range(n)))  # list(): re-raises the first error
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if bad.size:
        raise DataError(f"Record {int(bad[0])} of {name!r}/{split} has label {labels[bad[0]]}, "
                        f"outside the {len(class_names)} class names (TFDS marks unlabelled "
                        "examples, e.g. of imagenet2012's 'test' split, with -1).")
    return {"image": images, "label": labels, "class_names": class_names,
            "templates": tuple(templates)}


def load_tfds_retrieval(name: str = "coco_captions", *, split: str,
                        data_dir: str | os.PathLike | None, image_size: int,
                        max_examples: int | None = None, tokenizer: Tokenizer | None = None,
                        image_key: str = "image", caption_key: str = "captions/text",
                        num_threads: int | None = None,
                        resize_mode: str = "shortest") -> dict[str, Any]:
    """Loads (the first ``max_examples`` images of) a split of an image-text dataset with one or
    more captions per image, for retrieval evaluation (:mod:`vlm_jax.evaluators.retrieval`).

    Args:
        name: TFDS name, e.g. ``'coco_captions'`` (split ``'test'``: Karpathy's 5k images).
        split: split to read.
        data_dir: TFDS data directory; None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
        image_size: side S of the centre-cropped images.
        resize_mode: ``'shortest'`` (short side to S, centre crop) or ``'squash'``
            (``config.eval.resize_mode``).
        max_examples: load only the first this many images (with all their captions).
        tokenizer: optional, with ``encode(list[str]) -> int32 [N, L]``; if given, the captions
            are also returned tokenised as ``'text'``.
        image_key: the image feature.
        caption_key: the captions feature, ``/`` separating nested keys: a sequence of texts per
            image (``coco_captions``: ``'captions/text'``) or a single text.
        num_threads: decoding threads (default ``min(8, cpu_count)``).

    Returns:
        ``{'image': uint8 [N_img, S, S, 3], 'caption': list[str] (N_txt, every image's
        captions in order, images in record order), 'text_to_image': int32 [N_txt] (index in
        'image' of each caption's image)}``, plus ``'text': int32 [N_txt, L]`` with a
        tokenizer. An image without any caption is left out (with a warning): no caption could
        retrieve it.

    Raises:
        DataError: as :func:`load_tfds_classification`; also a missing caption feature.
    """
    source, _ = _open(name, split, data_dir, image_key)
    n = _num_examples(source, max_examples, f"split {split!r} of {name!r}")
    preprocess = _ImagePreprocess(image_size, resize_mode)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    captions: list[list[str]] = [[] for _ in range(n)]

    def load(i: int) -> None:
        raw = source[i]
        texts = _get(raw, caption_key, name)
        if isinstance(texts, (bytes, str)) or (isinstance(texts, np.ndarray) and texts.ndim == 0):
            texts = [texts]
        captions[i] = [to_str(t) for t in texts]
        if captions[i]:
            images[i] = preprocess(raw[image_key])

    with concurrent.futures.ThreadPoolExecutor(_threads(num_threads)) as pool:
        list(pool.map(load, range(n)))
    keep = [i for i in range(n) if captions[i]]
    if len(keep) < n:
        log.warning("%d of %d images of %s/%s have no caption and are left out.", n - len(keep),
                    n, name, split)
        if not keep:
            raise DataError(f"No image of {name!r}/{split} (of the first {n}) has a caption in "
                            f"{caption_key!r}.")
        images = images[keep]
    flat = [c for i in keep for c in captions[i]]
    text_to_image = np.repeat(np.arange(len(keep), dtype=np.int32),
                              [len(captions[i]) for i in keep]).astype(np.int32)
    out: dict[str, Any] = {"image": images, "caption": flat, "text_to_image": text_to_image}
    if tokenizer is not None:
        out["text"] = np.asarray(tokenizer.encode(flat), np.int32)
    return out
