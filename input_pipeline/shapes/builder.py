"""TFDS builder of the "shapes" dataset, written to ArrayRecord without tensorflow.

``prepare()`` builds ``<data_dir>/shapes/<config>/<version>/`` once (idempotent, multi-process
safe) and returns that directory; it holds the ArrayRecord files, the TFDS metadata and the
sentencepiece tokenizer trained on the train captions (:data:`TOKENIZER_FILENAME`).
Read it back with ``tfds.data_source('shapes/64px', data_dir=...)`` or
``tfds.builder_from_directory(dir).as_data_source()``; neither needs tensorflow.

Why images are stored as PNG bytes in a plain ``Tensor(dtype=object)`` feature:
``tfds.features.Image`` encodes images through tensorflow at build time. Storing the PNG bytes
ourselves (PIL encodes, :class:`input_pipeline.transforms.DecodeImage` decodes) keeps
tensorflow, a wheel of several hundred MB plus its dependencies, out of the quickstart install;
reading ArrayRecord through ``tfds.data_source`` never needed it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import io
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from input_pipeline import DataError
from input_pipeline.shapes import generator
from input_pipeline.tokenizers import train_sentencepiece

NAME = "shapes"
DEFAULT_CONFIG = "64px"
SPLITS: tuple[str, ...] = ("train", "validation", "test", "test_heldout")
DEFAULT_SPLIT_SIZES: dict[str, int] = {
    "train": 50_000, "validation": 2_000, "test": 2_000, "test_heldout": 2_000}
TOKENIZER_PREFIX = "captions_spm"
TOKENIZER_FILENAME = f"{TOKENIZER_PREFIX}.model"
TOKENIZER_VOCAB_SIZE = 256
_INFO_FILE = "dataset_info.json"  # written last by TFDS: its presence marks a complete build


class ShapesConfig(tfds.core.BuilderConfig):
    """Builder config of the shapes dataset: the rendered image side in pixels."""

    def __init__(self, *, image_size: int, **kwargs):
        super().__init__(name=f"{image_size}px", **kwargs)
        self.image_size = image_size


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic image-caption dataset: coloured shapes with captions, labels and QA pairs."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Main object always large and near the centre.",
                     "1.2.0": "Localisation features: every object's box, class, referring "
                              "expression and grounded caption; one referring expression per "
                              "record and its box. Images, captions, labels and questions are "
                              "those of 1.1.0."}
    BUILDER_CONFIGS = [
        ShapesConfig(image_size=64, description="64x64 images (default)."),
        ShapesConfig(image_size=32, description="32x32 images, for the fastest CPU runs."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = DEFAULT_CONFIG
    # Nothing to download. Also skips TFDS' checksum-file lookup, which for a builder outside
    # tensorflow_datasets imports the optional `importlib_resources` package (not installed).
    url_infos = None

    def __init__(self, *, split_sizes: Mapping[str, int] | None = None,
                 pool: concurrent.futures.Executor | None = None, **kwargs):
        """Args: split_sizes: examples per split (default :data:`DEFAULT_SPLIT_SIZES`);
        pool: processes that render and encode the examples (None: this process);
        kwargs: ``tfds.core.DatasetBuilder`` arguments (``data_dir``, ``config``, ...)."""
        self._pool = pool
        self._split_sizes = dict(split_sizes or DEFAULT_SPLIT_SIZES)
        if set(self._split_sizes) != set(SPLITS):
            raise DataError(f"split_sizes needs exactly the splits {SPLITS}, "
                            f"got {sorted(self._split_sizes)}.")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Synthetic image-caption data: one to three coloured shapes per image, a "
                "caption, a label (colour and shape of the largest object, 30 classes) and a "
                "question/answer pair; per object its box, class, a minimal unambiguous "
                "referring expression and a grounded caption, and per record one referring "
                "expression with its box. Images are PNG bytes. Generator: "
                "input_pipeline/shapes/generator.py."),
            features=tfds.features.FeaturesDict({
                "index": tfds.features.Scalar(np.int64, doc="render_example index"),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_, doc="PNG bytes"),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=generator.CLASS_NAMES),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                # Localisation (generator.scene_locations); main object first.
                "objects": tfds.features.Sequence({
                    "bbox": tfds.features.BBoxFeature(
                        doc="ymin, xmin, ymax, xmax in fractions of the image side"),
                    "label": tfds.features.ClassLabel(names=generator.CLASS_NAMES),
                    "refexp": tfds.features.Text(doc="minimal unambiguous referring expression"),
                    "caption": tfds.features.Text(doc="grounded caption of the object's box"),
                }),
                "refexp": tfds.features.Text(doc="referring expression of objects[refexp_object]"),
                "refexp_bbox": tfds.features.BBoxFeature(doc="box of the referred object"),
                "refexp_object": tfds.features.Scalar(np.int64, doc="index into objects"),
            }),
            # Record i of a split is example i: files are traceable to render_example().
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download.
        # self.data_dir is the temporary build directory here: the tokenizer is moved into
        # place together with the records when the build completes.
        captions = self._map(functools.partial(_caption, generator.SPLIT_SEEDS["train"]),
                             self._split_sizes["train"])
        train_sentencepiece(captions, os.path.join(self.data_dir, TOKENIZER_PREFIX),
                            TOKENIZER_VOCAB_SIZE)
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        encode = functools.partial(encoded_record, generator.SPLIT_SEEDS[split],
                                   image_size=self.builder_config.image_size)
        yield from enumerate(self._map(encode, self._split_sizes[split]))

    def _map(self, fn, size: int) -> Iterator:
        """``fn(0), ..., fn(size - 1)`` in order (so the files are those of a serial build byte
        for byte), in the pool's processes when there is one and ``size`` is worth it."""
        if self._pool is None or size < _PARALLEL_MIN_EXAMPLES:
            return map(fn, range(size))
        return self._pool.map(fn, range(size), chunksize=_chunk(size))

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and a "downloaded" line;
    # prepare() prints one accurate line instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


# Splits smaller than this are rendered in the building process: starting the pool costs more.
_PARALLEL_MIN_EXAMPLES = 4096


def _workers() -> int:
    """Processes that render a build: one per core (8 at most), or 1 (no pool)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def _chunk(size: int) -> int:
    """Examples per task sent to a worker: few round trips, yet 8 tasks per worker at least."""
    return max(1, min(512, size // (8 * _workers())))


def _caption(split_seed: int, index: int) -> str:
    """The caption of example ``index`` (the tokenizer's training text; module-level: pickled
    to the workers)."""
    return generator.sample_scene(split_seed, index).caption


def encoded_record(split_seed: int, index: int, image_size: int) -> dict:
    """Record ``index`` of the split with seed ``split_seed`` as the builder stores it: the
    rendered example (:func:`generator.scene_example`), its localisation targets and the image
    as PNG bytes. A module-level function: the build's worker processes unpickle it."""
    scene = generator.sample_scene(split_seed, index)
    example = generator.scene_example(scene, image_size)
    example.update(generator.scene_locations(scene, split_seed, index))
    png = io.BytesIO()
    Image.fromarray(example["image"]).save(png, format="PNG")
    example["image"] = png.getvalue()
    example["index"] = index
    return example


@contextlib.contextmanager
def _render_pool(total: int) -> Iterator[concurrent.futures.Executor | None]:
    """A process pool for a build of ``total`` examples on a machine with several cores, else
    None. Rendering and PNG encoding are ~80 % of a build's time and hold the GIL, hence
    processes; 'spawn', as the parent may already run jax's threads (fork is unsafe then)."""
    workers = _workers()
    if workers < 2 or total < _PARALLEL_MIN_EXAMPLES:
        yield None
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def dataset_dir(data_dir: str | os.PathLike | None = None,
                config: str = DEFAULT_CONFIG) -> epath.Path:
    """Directory ``<data_dir>/shapes/<config>/<version>`` of a prepared shapes dataset."""
    return epath.Path(data_dir or default_data_dir()) / NAME / config / str(Shapes.VERSION)


def tokenizer_path(data_dir: str | os.PathLike | None = None,
                   config: str = DEFAULT_CONFIG) -> epath.Path:
    """Path of the sentencepiece model trained on the train captions of a prepared dataset."""
    return dataset_dir(data_dir, config) / TOKENIZER_FILENAME


def _requested_sizes(num_train: int | None, num_eval: int | None) -> dict[str, int]:
    """The split sizes the caller asked for explicitly (None = any / default)."""
    sizes = {} if num_train is None else {"train": num_train}
    if num_eval is not None:
        sizes.update({s: num_eval for s in SPLITS if s != "train"})
    if sizes and min(sizes.values()) < 1:
        raise DataError(f"Every split of shapes needs >= 1 example, got {sizes}.")
    return sizes


def _is_complete(ds_dir: epath.Path) -> bool:
    return (ds_dir / _INFO_FILE).exists()


def _check_existing(ds_dir: epath.Path, requested: Mapping[str, int]) -> None:
    """Raises DataError if the dataset at ``ds_dir`` is not the one requested."""
    info = json.loads((ds_dir / _INFO_FILE).read_text())
    found = {s["name"]: sum(int(n) for n in s.get("shardLengths", []))
             for s in info.get("splits", [])}
    if any(found.get(split) != n for split, n in requested.items()):
        raise DataError(
            f"The shapes dataset at {ds_dir} has split sizes {found}, but {dict(requested)} "
            "were requested. Use another data_dir, pass num_train/num_eval=None to use the "
            f"existing dataset, or delete {ds_dir} to rebuild it."
        )
    if not (ds_dir / TOKENIZER_FILENAME).exists():
        raise DataError(f"{ds_dir} has no {TOKENIZER_FILENAME}: it was not built by "
                        f"input_pipeline.shapes. Delete {ds_dir} and run prepare() again.")


@contextlib.contextmanager
def _build_lock(data_dir: epath.Path, config: str) -> Iterator[None]:
    """Exclusive lock between builders on one machine (e.g. parallel test workers).

    Only local file systems support it; elsewhere, process 0 of the job is the only builder.
    """
    if "://" not in os.fspath(data_dir):
        lock_path = data_dir / NAME / f".{config}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        yield


def prepare(data_dir: str | os.PathLike | None = None, config: str = DEFAULT_CONFIG,
            num_train: int | None = None, num_eval: int | None = None, *,
            process_index: int | None = None, timeout_s: float = 3600.0,
            progress: bool = True) -> epath.Path:
    """Builds the shapes dataset if it is missing and returns its directory.

    Idempotent. In a multi-process job only ``process_index`` 0 builds; the others wait until
    the build completes (for a ``data_dir`` shared by all processes). An existing dataset is
    used whatever its sizes, unless ``num_train`` / ``num_eval`` ask for other ones.

    Args:
        data_dir: TFDS data directory; default :func:`default_data_dir`.
        config: builder config, ``"64px"`` or ``"32px"``.
        num_train: train examples; None: any existing dataset, else
            ``DEFAULT_SPLIT_SIZES['train']`` (50k) when building.
        num_eval: examples of each of validation, test and test_heldout; None: any existing,
            else 2000 when building.
        process_index: index of this process; default ``jax.process_index()``.
        timeout_s: how long processes other than 0 wait for the build.
        progress: show TFDS progress bars while building.

    Returns:
        The dataset directory ``<data_dir>/shapes/<config>/<version>``.

    Raises:
        DataError: unknown config, an existing dataset of other split sizes, or a timeout
            waiting for process 0.
    """
    configs = [c.name for c in Shapes.BUILDER_CONFIGS]
    if config not in configs:
        raise DataError(f"Unknown shapes config {config!r}; choose one of {configs}.")
    root = epath.Path(data_dir or default_data_dir())
    requested = _requested_sizes(num_train, num_eval)
    ds_dir = dataset_dir(root, config)
    if _is_complete(ds_dir):
        _check_existing(ds_dir, requested)
        return ds_dir
    if process_index is None:
        import jax  # pylint: disable=import-outside-toplevel

        process_index = jax.process_index()

    if process_index != 0:
        deadline = time.monotonic() + timeout_s
        while not _is_complete(ds_dir):
            if time.monotonic() > deadline:
                raise DataError(
                    f"Process {process_index} waited {timeout_s:.0f} s for process 0 to build "
                    f"{ds_dir}. If data_dir is not shared between hosts, build the dataset on "
                    "every host first (input_pipeline.shapes.prepare(..., process_index=0)); "
                    "otherwise check the logs of process 0."
                )
            time.sleep(1.0)
        _check_existing(ds_dir, requested)
        return ds_dir

    with _build_lock(root, config):
        if not _is_complete(ds_dir):  # another local process may have built it meanwhile
            sizes = {**DEFAULT_SPLIT_SIZES, **requested}
            print(f"Generating {NAME}/{config} {Shapes.VERSION} ({sizes}) into {ds_dir}",
                  flush=True)
            previous = tfds.core.utils.tqdm_utils._active  # pylint: disable=protected-access
            tfds.display_progress_bar(progress)
            try:
                with _render_pool(sum(sizes.values())) as pool:
                    builder = Shapes(data_dir=os.fspath(root), config=config,
                                     split_sizes=sizes, pool=pool)
                    builder.download_and_prepare(file_format="array_record")
            finally:
                tfds.display_progress_bar(previous)
    _check_existing(ds_dir, requested)
    return ds_dir
