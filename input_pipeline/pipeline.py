"""grain pipelines over TFDS ArrayRecord datasets: a sharded train iterator and eval arrays.

A dataset is read from ``<data_dir>/<dataset>/<config_name>/<version>/`` (the newest version
there), which must hold the TFDS files and the caption tokenizer
(:data:`input_pipeline.shapes.TOKENIZER_FILENAME`). Examples need the features ``image``
(encoded bytes or uint8 array), ``caption`` and ``label``. Nothing is built here: for the
default dataset call :func:`input_pipeline.shapes.prepare` first.

Every process reads only its own share of each global batch; per-process batches of
``global_batch_size // process_count`` examples are what
``jax.make_array_from_process_local_data`` assembles into the global batch, which is the same
whatever the number of processes (see :func:`create_train_iterator`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import DataError
from input_pipeline import shapes, sources
from input_pipeline.tokenizers import SentencePieceTokenizer
from input_pipeline.transforms import (NO_FILTERS, SampleFilters, embedding_transforms,
                                      example_transforms, pair_transforms, to_str)

# Zero-shot prompt templates per dataset; other datasets use the generic CLIP prompt.
_TEMPLATES: dict[str, tuple[str, ...]] = {"shapes": shapes.ZERO_SHOT_TEMPLATES}
_DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def _dataset_dir(data_dir: str | os.PathLike | None, dataset: str,
                 config_name: str) -> epath.Path:
    """Newest prepared version directory of ``dataset/config_name`` under ``data_dir``."""
    parent = epath.Path(data_dir or shapes.default_data_dir()) / dataset / config_name
    versions = []
    if parent.exists():
        for child in parent.iterdir():
            try:
                version = tfds.core.Version(child.name)
            except ValueError:  # not a version directory (e.g. an incomplete build)
                continue
            if (child / "dataset_info.json").exists():
                versions.append((version, child))
    if not versions:
        root = os.fspath(parent.parent.parent)
        fix = (f"Build it with input_pipeline.shapes.prepare(data_dir={root!r}, "
               f"config={config_name!r})" if dataset == "shapes" else
               "Prepare it with TFDS (file_format='array_record') into that data_dir")
        raise DataError(f"No prepared dataset at {parent}/<version>/. {fix}, or point "
                        "data_dir at the directory that holds it.")
    return max(versions)[1]


def split_builder(data_dir: str | os.PathLike | None, dataset: str, config_name: str,
                  splits: tuple[str, ...] | list[str]) -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset, from its metadata files alone (nothing is read or
    decoded): its ``info.features`` say which keys :func:`load_eval_split` returns.

    Raises:
        DataError: the dataset is not prepared in ``data_dir`` or lacks one of ``splits``.
    """
    builder = tfds.builder_from_directory(_dataset_dir(data_dir, dataset, config_name))
    for split in splits:
        if split not in builder.info.splits:
            raise DataError(f"{builder.data_dir} has no split {split!r}; it has "
                            f"{sorted(builder.info.splits)}.")
    return builder


def _data_source(data_dir: str | os.PathLike | None, dataset: str, config_name: str,
                 split: str) -> tuple[Any, tfds.core.DatasetBuilder]:
    """Random-access source of one split and its builder (for metadata).

    Metadata is read through etils.epath, records through array_record (``gs://`` data_dirs
    too: see :func:`input_pipeline.sources.check_array_record_gcs`).
    """
    sources.check_array_record_gcs(os.fspath(data_dir or shapes.default_data_dir()))
    builder = split_builder(data_dir, dataset, config_name, [split])
    return builder.as_data_source(split), builder


class FeatureSubset:
    """The records of a TFDS data source with only the features ``keys`` parsed and decoded.

    TFDS' numpy data sources parse every feature of a record (``tfds.decode.PartialDecoding``
    applies to tf.data only), and its per-feature Python cost dominates reading a small record:
    shapes 1.2.0's localisation features doubled the read time of the features the training
    stream uses. The parser skips the features its spec does not name.
    """

    def __init__(self, source, keys: tuple[str, ...]):
        self._source = source
        features = source.dataset_info.features
        self._features = tfds.features.FeaturesDict(
            {k: features[k] for k in keys if k in features})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self._features.deserialize_example_np(self._source.data_source[index])


def _read_options() -> grain.ReadOptions:
    """Reader threads per process. grain's default (16 threads, 500 records in flight) polls
    every in-flight record per element: on a 2-core machine that ran 3x slower than this."""
    return grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1), prefetch_buffer_size=64)


POSITION_KEY = "_position"  # stream position of each example of a filtered (pair) stream


class _WithPosition(grain.transforms.MapWithIndex):
    """Adds the example's global stream position (a module-level class: grain workers pickle
    it)."""

    def map_with_index(self, index: int, element: dict) -> dict:
        return {**element, POSITION_KEY: np.int64(index)}


def _iterate(it_ds: grain.IterDataset, worker_count: int) -> grain.DatasetIterator:
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


class StreamIterator(grain.DatasetIterator):
    """This process's batches of one global stream, restartable at any global position.

    Every training pipeline here is one lazily indexed stream (a grain ``MapDataset``: records,
    or documents, shuffled per epoch from the seed) of which global batch ``t`` is positions
    ``[t * G, (t + 1) * G)`` and process ``i`` of ``n`` reads the positions ``p % n == i``. So
    the state of the whole run after ``t`` steps is one number, the global position
    ``P = t * G``, and process ``i`` of *any* count ``n`` dividing ``G`` continues from it by
    reading ``stream[P + i :: n]``. The pipelines hand this class ``build(start)``, which makes
    grain's iterator over ``stream[start + i :: n]`` (sliced before decoding, so a process still
    loads only its own examples); this class counts the steps taken since ``start``.

    ``get_state()`` (what a checkpoint stores per process) holds grain's own iterator state,
    with the ``start`` it is relative to, and the global ``position``:

    * :meth:`set_state` with this process's own state (same index and count) restores grain's
      state: bit-exact, prefetch and worker states included, as a plain grain iterator does;
    * :meth:`seek` restarts at a global position, for a checkpoint written by another number of
      processes (``vlm_jax.checkpoint`` reads ``position`` from any process's state).

    This is grain's ``ElasticIterator`` idea (one global index instead of per-shard state),
    kept around the project's own pipelines because ``ElasticIterator`` refuses ``filter``
    (the raw-pair pipeline drops bad samples), batches itself, and would give up grain's exact
    per-process state when the process count does not change.

    Streams that drop bad samples (``tracks_positions``) carry each example's position
    (:data:`POSITION_KEY`, removed here) so that the state also records ``next_position``, the
    next position this process would read: ``position + i`` until the process skips a sample,
    beyond it after. The global position of such a stream is a function of the step only while
    nothing was skipped; that is what decides whether a re-mapped resume is exact. With grain
    workers that pipeline batches after the filter in each worker, from the worker's own share
    of the positions, so its batches are not consecutive positions (``positional`` False) and
    it cannot be re-mapped; the other pipelines batch before the workers split the stream and
    re-map with any worker count.
    """

    def __init__(self, build: Callable[[int], grain.DatasetIterator], *, global_batch_size: int,
                 process_index: int, process_count: int, tracks_positions: bool = False,
                 positional: bool = True):
        super().__init__()
        self.positional = positional
        self._build = build
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.tracks_positions = tracks_positions
        self._start, self._steps = 0, 0
        self._next_position = process_index
        self._it: grain.DatasetIterator | None = None  # built on first use (workers start then)

    def _iterator(self) -> grain.DatasetIterator:
        if self._it is None:
            self._it = self._build(self._start)
        return self._it

    def __next__(self) -> dict:
        batch = next(self._iterator())
        self._steps += 1
        if self.tracks_positions:
            batch = dict(batch)
            self._next_position = int(np.max(batch.pop(POSITION_KEY))) + self.process_count
        else:
            self._next_position = self.position + self.process_index
        return batch

    @property
    def position(self) -> int:
        """Global stream position: the examples all processes together have consumed."""
        return self._start + self._steps * self.global_batch_size

    def get_state(self) -> dict[str, Any]:
        return {"position": self.position, "start": self._start,
                "next_position": self._next_position,
                "global_batch_size": self.global_batch_size,
                "process_index": self.process_index, "process_count": self.process_count,
                "tracks_positions": self.tracks_positions, "positional": self.positional,
                "iterator": self._iterator().get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state this process (same index and count) saved, exactly."""
        if "webdataset_stream" in state:
            raise DataError("The checkpoint's data-iterator state is of a streamed webdataset "
                            f"(config.data.webdataset_mode={state['webdataset_stream']!r}); "
                            "resume with that webdataset_mode.")
        if (state["process_index"], state["process_count"]) != (self.process_index,
                                                                self.process_count):
            raise ValueError(f"State of process {state['process_index']} of "
                             f"{state['process_count']} given to process {self.process_index} "
                             f"of {self.process_count}; use seek(state['position']).")
        self._restart(state["start"])
        self._steps = (state["position"] - state["start"]) // self.global_batch_size
        self._next_position = state["next_position"]
        self._iterator().set_state(state["iterator"])

    def seek(self, position: int) -> None:
        """Continues the global stream at ``position`` (a multiple of the global batch size):
        the next batch is this process's share of positions ``[position, position + G)``."""
        if position % self.global_batch_size:
            raise ValueError(f"Position {position} is not a multiple of the global batch size "
                             f"{self.global_batch_size}.")
        self._restart(position)
        self._next_position = position + self.process_index

    def _restart(self, start: int) -> None:
        if self._it is not None:
            self._it.close()
        self._it, self._start, self._steps = None, start, 0

    def start_prefetch(self) -> None:
        self._iterator().start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()


def tokenizer_for(data_dir: str | os.PathLike | None, dataset: str = "shapes",
                  config_name: str = shapes.DEFAULT_CONFIG,
                  context_length: int = 77) -> SentencePieceTokenizer:
    """The caption tokenizer stored with a prepared dataset.

    Raises:
        DataError: the dataset or its tokenizer file is missing.
    """
    ds_dir = _dataset_dir(data_dir, dataset, config_name)
    return SentencePieceTokenizer(ds_dir / shapes.TOKENIZER_FILENAME, context_length)


def create_train_iterator(*, data_dir: str | os.PathLike | None, dataset: str = "shapes",
                          config_name: str = shapes.DEFAULT_CONFIG, split: str = "train",
                          global_batch_size: int, seed: int, context_length: int,
                          process_index: int | None = None, process_count: int | None = None,
                          worker_count: int = 0, num_epochs: int | None = None,
                          image_size: int | None = None,
                          targets: Any = None) -> StreamIterator:
    """Shuffled, sharded, batched iterator over a split for this process.

    Yields dicts ``{'image': uint8 [B, S, S, 3], 'text': int32 [B, L], 'label': int32 [B]}``
    with ``B = global_batch_size // process_count``. The iterator's ``get_state()`` /
    ``set_state()`` restore the exact position (the train loop stores the state in every
    checkpoint).

    The *global* batch of step ``t`` does not depend on the number of processes: the records
    form one stream, reshuffled each epoch from ``seed``; global batch ``t`` is positions
    ``[t * G, (t + 1) * G)`` of that stream (``G = global_batch_size``) and process ``i`` of
    ``n`` reads the positions ``p`` with ``p % n == i``, so it loads (and decodes) only its own
    ``G / n`` examples of each batch. A run on 2 hosts therefore trains on exactly the batches
    of a run on 1 host (rows in another order, which no batch-mean loss sees), and a run can
    resume on a different number of hosts (:class:`StreamIterator` restarts at the global
    position ``t * G``).

    Args:
        data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets).
        dataset: dataset name.
        config_name: builder config, e.g. ``"64px"``.
        split: split to read.
        global_batch_size: examples per step over all processes.
        seed: shuffling seed.
        context_length: token sequence length L.
        process_index: this process; default ``jax.process_index()``.
        process_count: number of processes; default ``jax.process_count()``.
        worker_count: grain worker processes (0 = in the main process).
        num_epochs: epochs before the iterator ends (the last incomplete global batch is
            dropped); None = forever.
        image_size: resize and centre-crop images to this side; None keeps the stored size.
        targets: a grain ``RandomMap`` adding a family's targets to each raw record, with
            ``FEATURES`` (the raw features it reads) and ``OUTPUTS`` (``{key: dtype}`` it adds
            to the batch), e.g. :class:`input_pipeline.locca.LoccaTargets`. It is applied to
            the global stream, so its draws depend on ``(seed, position)``, not on the process
            count.

    Raises:
        DataError: missing dataset/tokenizer/split, a batch size not divisible by the process
            count, or a split too small for one batch.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                        f"process count {process_count}; choose a multiple of {process_count}.")
    local_batch_size = global_batch_size // process_count
    source, _ = _data_source(data_dir, dataset, config_name, split)
    if len(source) < global_batch_size:
        raise DataError(f"Split {split!r} of {dataset}/{config_name} has {len(source)} records, "
                        f"fewer than one global batch of {global_batch_size}. Lower the batch "
                        "size or build a larger split.")
    tokenizer = tokenizer_for(data_dir, dataset, config_name, context_length)
    extra = tuple(targets.FEATURES) if targets is not None else ()
    # example_transforms' input (and the targets').
    source = FeatureSubset(source, ("image", "caption", "label") + extra)
    # One global stream, reshuffled per epoch (grain reseeds each repetition).
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:  # Whole global batches only, so every process stops together.
        ds = ds[:len(ds) // global_batch_size * global_batch_size]
    if targets is not None:  # per-element rng from (seed, global position)
        ds = ds.random_map(targets, seed=seed)
    ops = example_transforms(tokenizer, image_size,
                             keep=targets.OUTPUTS if targets is not None else None)

    def build(start: int) -> grain.DatasetIterator:
        part = ds[start + process_index::process_count]
        for op in ops:
            part = part.map(op)
        part = part.batch(local_batch_size, drop_remainder=True)
        return _iterate(part.to_iter_dataset(_read_options()), worker_count)

    return StreamIterator(build, global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count)


def create_pair_iterator(source, *, tokenizer, global_batch_size: int, seed: int,
                         image_size: int, process_index: int | None = None,
                         process_count: int | None = None, worker_count: int = 0,
                         num_epochs: int | None = None, min_side: int = 8,
                         max_pixels: int = 8192 * 8192,
                         filters: SampleFilters = NO_FILTERS) -> StreamIterator:
    """Batches of ``{'image', 'text', 'label'}`` from a random-access source of raw image-text
    records (:mod:`input_pipeline.sources`: webdataset tars, ArrayRecord shards), or from a
    weighted mixture given as a list of ``(source, weight)``.

    Same stream and sharding as :func:`create_train_iterator` (one shuffled stream, process
    ``i`` of ``n`` reads positions ``p % n == i``); bad samples are dropped before batching and
    counted in :data:`input_pipeline.transforms.SKIP_STATS` (with their reason), so a batch is
    always full; so are the samples ``filters`` reject (caption length, aspect ratio, metadata
    predicates: :class:`input_pipeline.transforms.SampleFilters`). Dropping happens per
    process, so with bad samples the 1-process and n-process streams differ by the skipped
    records, and the global position after ``t`` steps is ``t * G`` only while nothing was
    skipped: a checkpoint re-maps exactly onto another process count only then (the iterator
    records how far each process has read; see :class:`StreamIterator`).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                        f"process count {process_count}; choose a multiple of {process_count}.")
    parts = source if isinstance(source, (list, tuple)) else [(source, 1.0)]
    for src, weight in parts:
        if len(src) < global_batch_size:
            raise DataError(f"{src!r} has {len(src)} samples, fewer than one global batch of "
                            f"{global_batch_size}.")
        if not weight > 0:
            raise DataError(f"Mixture weight {weight} of {src!r} must be positive.")
    streams = [grain.MapDataset.source(src).shuffle(seed=seed + i).repeat(num_epochs)
               for i, (src, _) in enumerate(parts)]
    # A weighted mixture interleaves the sources' streams deterministically (grain's mix).
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(
        streams, [float(w) for _, w in parts])
    for op in pair_transforms(tokenizer, image_size, min_side, max_pixels, train=True,
                              filters=filters):
        if isinstance(op, grain.transforms.Filter):
            ds = ds.filter(op)
        elif isinstance(op, grain.transforms.RandomMap):
            ds = ds.random_map(op, seed=seed)  # per-element rng from (seed, position)
        else:
            ds = ds.map(op)
    # Each kept example carries its stream position (StreamIterator tracks how far this process
    # has read: with bad samples dropped, that is further than its share of steps * batch).
    ds = ds.map_with_index(_WithPosition())

    def build(start: int) -> grain.DatasetIterator:
        # Sliced last: MapDataset is lazy, so each process still decodes only its own positions,
        # while the random crop of a record depends on its global position, not the process
        # count.
        part = ds[start + process_index::process_count]
        it_ds = part.to_iter_dataset(_read_options()).batch(global_batch_size // process_count,
                                                            drop_remainder=True)
        return _iterate(it_ds, worker_count)

    # With grain workers each worker batches its own share of the process's positions, so the
    # batches are not consecutive stream positions: such a stream has no global position.
    return StreamIterator(build, global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count,
                          tracks_positions=True, positional=worker_count == 0)


def create_embedding_iterator(source, *, tokenizer, global_batch_size: int, seed: int,
                              dim: int, process_index: int | None = None,
                              process_count: int | None = None, worker_count: int = 0,
                              num_epochs: int | None = None) -> StreamIterator:
    """Batches of ``{'image_emb' float32 [B, dim], 'text' int32 [B, L]}`` from cached image
    embeddings (:class:`input_pipeline.sources.ArrayRecordSource` of the shards
    ``vlm-jax data embed`` writes, one record per training example in the source's order).

    The stream is :func:`create_train_iterator`'s (one shuffled stream from ``seed``, process
    ``i`` of ``n`` reading positions ``p % n == i``), so on a cache of the shapes train split
    global batch ``t`` holds the embeddings of exactly the images the live pipeline ships at
    step ``t``: a run on the cache trains on the same pairs as a run with the live tower.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                        f"process count {process_count}; choose a multiple of {process_count}.")
    if len(source) < global_batch_size:
        raise DataError(f"{source!r} has {len(source)} records, fewer than one global batch of "
                        f"{global_batch_size}.")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[:len(ds) // global_batch_size * global_batch_size]
    ops = embedding_transforms(tokenizer, dim)

    def build(start: int) -> grain.DatasetIterator:
        part = ds[start + process_index::process_count]
        for op in ops:
            part = part.map(op)
        part = part.batch(global_batch_size // process_count, drop_remainder=True)
        return _iterate(part.to_iter_dataset(_read_options()), worker_count)

    return StreamIterator(build, global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count)


class ShardStreamIterator(grain.DatasetIterator):
    """This process's batches of a streamed webdataset corpus
    (:func:`create_webdataset_stream_iterator`), checkpointable like :class:`StreamIterator`.

    ``get_state()`` holds grain's state of the whole pipeline: the shard cursor, the byte offset
    in the current shard and the shuffle buffer's positions of every reader
    (:class:`input_pipeline.sources.WebDatasetStream`), with grain's own worker and prefetch
    state. :meth:`set_state` restores it exactly on the same process count and
    ``worker_count``. There is no global stream position to re-map onto another process count
    (each process reads shards of its own; see docs/design.md), so this iterator has no
    ``seek``: ``vlm_jax.checkpoint`` then refuses such a resume with a CheckpointError.
    """

    def __init__(self, build: Callable[[], grain.DatasetIterator], *, mode: str,
                 global_batch_size: int, process_index: int, process_count: int,
                 worker_count: int):
        super().__init__()
        self._build = build
        self.mode = mode
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.worker_count = worker_count
        self.tracks_positions, self.positional = False, False
        self._it: grain.DatasetIterator | None = None  # built on first use (workers start then)

    def _iterator(self) -> grain.DatasetIterator:
        if self._it is None:
            self._it = self._build()
        return self._it

    def __next__(self) -> dict:
        return next(self._iterator())

    def get_state(self) -> dict[str, Any]:
        return {"webdataset_stream": self.mode, "global_batch_size": self.global_batch_size,
                "process_index": self.process_index, "process_count": self.process_count,
                "worker_count": self.worker_count, "iterator": self._iterator().get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state this process saved (same process index and count, worker count,
        mode and global batch size), exactly.

        Raises:
            DataError: the state is of another stream, process, worker count or batch size.
        """
        if "webdataset_stream" not in state:
            raise DataError("The checkpoint's data-iterator state is not of a streamed webdataset "
                            "(it was written with config.data.webdataset_mode='indexed' or "
                            "another source); resume with the webdataset_mode that wrote it.")
        saved = {k: state[k] for k in ("webdataset_stream", "global_batch_size",
                                        "process_index", "process_count", "worker_count")}
        now = {"webdataset_stream": self.mode, "global_batch_size": self.global_batch_size,
               "process_index": self.process_index, "process_count": self.process_count,
               "worker_count": self.worker_count}
        if saved != now:
            diff = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if saved[k] != now[k])
            raise DataError(f"Cannot restore the streamed webdataset position exactly ({diff}): "
                            "each process and grain worker reads shards of its own, so resume "
                            "with the settings that wrote the checkpoint (config.data."
                            "worker_count, batch_size, webdataset_mode and the process count).")
        self._iterator().set_state(state["iterator"])

    def start_prefetch(self) -> None:
        self._iterator().start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()


def create_webdataset_stream_iterator(shards, *, tokenizer, global_batch_size: int, seed: int,
                                      image_size: int, mode: str = "stream",
                                      shuffle_buffer: int = 1000, samples_per_epoch: int = 0,
                                      process_index: int | None = None,
                                      process_count: int | None = None, worker_count: int = 0,
                                      min_side: int = 8, max_pixels: int = 8192 * 8192,
                                      filters: SampleFilters = NO_FILTERS
                                      ) -> ShardStreamIterator:
    """Batches of ``{'image', 'text', 'label'}`` from webdataset tar shards read as streams
    (``config.data.webdataset_mode`` 'stream' or 'resampled'), for corpora too large to index:
    start-up and host memory do not grow with the number of samples.

    ``shards``: a :class:`input_pipeline.sources.WebDatasetShards` (or a list of paths). Each
    process, and each of its ``worker_count`` grain workers, reads whole shards of its own
    through a shuffle buffer of ``shuffle_buffer`` raw samples
    (:class:`input_pipeline.sources.WebDatasetStream`, which says how shards are assigned and
    drawn); bad samples (and those ``filters`` reject) are skipped and counted as in
    :func:`create_pair_iterator`, unreadable
    shards too (``unreadable_shard``). Unlike the indexed pipelines there is no global shuffle
    and the stream depends on the process and worker counts: a checkpoint resumes exactly on
    the counts that wrote it, and only on those (:class:`ShardStreamIterator`).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                        f"process count {process_count}; choose a multiple of {process_count}.")
    paths = list(getattr(shards, "paths", shards))
    readers = process_count * max(worker_count, 1)
    if mode == "stream" and len(paths) < readers:  # before any worker process starts
        raise DataError(
            f"{len(paths)} tar shard(s) for {process_count} process(es) x "
            f"{max(worker_count, 1)} grain worker(s): in webdataset_mode='stream' each reads "
            "whole shards of its own, so there must be at least as many shards. Lower "
            "config.data.worker_count, or use webdataset_mode='resampled' or 'indexed'.")
    ds: grain.IterDataset = sources.WebDatasetStream(
        paths, mode=mode, seed=seed, shuffle_buffer=shuffle_buffer,
        samples_per_epoch=samples_per_epoch, process_index=process_index,
        process_count=process_count)
    # Augmentation: grain seeds each element's generator from (seed, element count, worker),
    # restored with the iterator; the process index enters the seed so that hosts crop
    # differently.
    aug_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    for op in pair_transforms(tokenizer, image_size, min_side, max_pixels, train=True,
                              filters=filters):
        if isinstance(op, grain.transforms.Filter):
            ds = ds.filter(op)
        elif isinstance(op, grain.transforms.RandomMap):
            ds = ds.random_map(op, seed=aug_seed)
        else:
            ds = ds.map(op)
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)

    def build() -> grain.DatasetIterator:
        return _iterate(ds, worker_count)

    return ShardStreamIterator(build, mode=mode, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count,
                               worker_count=worker_count)


def load_eval_split(*, data_dir: str | os.PathLike | None, dataset: str = "shapes",
                    config_name: str = shapes.DEFAULT_CONFIG, split: str = "test",
                    context_length: int, max_examples: int | None = None,
                    image_size: int | None = None) -> dict[str, Any]:
    """Loads (the first ``max_examples`` records of) a split into memory, in record order.

    Returns:
        ``{'image': uint8 [N, S, S, 3] (normalised by the model), 'text': int32 [N, L],
        'label': int32 [N], 'caption' / 'question' / 'answer' / 'refexp': list[str] (those
        present), 'refexp_bbox': float32 [N, 4] (with 'refexp'),
        'class_names': list[str], 'templates': tuple[str, ...]}``; zero-shot classification
        prompts are ``template.format(class_name)``. :func:`eval_split_keys` gives these keys
        without reading the split.
    """
    source, builder = _data_source(data_dir, dataset, config_name, split)
    tokenizer = tokenizer_for(data_dir, dataset, config_name, context_length)
    n = len(source) if max_examples is None else min(max_examples, len(source))
    if n < 1:
        raise DataError(f"max_examples={max_examples}: need at least one example of {split!r}.")
    ops = example_transforms(tokenizer, image_size)
    arrays: dict[str, list] = {"image": [], "text": [], "label": []}
    texts: dict[str, list[str]] = {}
    for i in range(n):
        raw = source[i]
        for key in EVAL_TEXT_KEYS:
            if key in raw:
                texts.setdefault(key, []).append(to_str(raw[key]))
        for key in EVAL_ARRAY_KEYS:
            if key in raw:
                arrays.setdefault(key, []).append(np.asarray(raw[key], np.float32))
        example = raw
        for op in ops:
            example = op.map(example)
        for key in MODEL_KEYS:
            arrays[key].append(example[key])
    out: dict[str, Any] = {k: np.stack(v) for k, v in arrays.items()}
    out.update(texts)
    out["class_names"] = list(builder.info.features["label"].names)
    out["templates"] = _TEMPLATES.get(dataset, _DEFAULT_TEMPLATES)
    return out


MODEL_KEYS = ("image", "text", "label")
# Returned by load_eval_split when present: texts as lists, arrays stacked.
EVAL_TEXT_KEYS = ("caption", "question", "answer", "refexp")
EVAL_ARRAY_KEYS = ("refexp_bbox",)


def eval_split_keys(builder: tfds.core.DatasetBuilder) -> set[str]:
    """The keys :func:`load_eval_split` returns for a dataset (:func:`split_builder`), from its
    features alone."""
    features = builder.info.features
    return ({"image", "text", "label", "class_names", "templates"}
            | {k for k in EVAL_TEXT_KEYS + EVAL_ARRAY_KEYS if k in features})
