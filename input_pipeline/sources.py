"""Random-access sources of image-text pairs: webdataset tar shards and ArrayRecord shards.

Both are grain ``RandomAccessDataSource``s (``len`` and ``__getitem__``), so they go through the
same grain pipeline (global shuffle, per-process reading, checkpointable iterator) as TFDS
datasets. A record is a dict::

    {'key': str, 'image': bytes | None, 'caption': bytes | None, 'metadata': bytes | None,
     'source': str}

``image``/``caption`` are ``None`` when the shard lacks them; deciding what to do with such a
record (skip and count it) is the transforms' job (:mod:`input_pipeline.transforms`), so one
bad sample never stops a run.

* :class:`WebDatasetSource` reads tar shards as img2dataset writes them: members
  ``<key>.jpg|jpeg|png|webp``, ``<key>.txt``, ``<key>.json`` grouped by key. Opening a source
  indexes every shard (member names and data offsets, no payload is read); a record is then one
  seek + read. A shard that is not a readable tar, or is truncated, is skipped with its path
  and the reason in :attr:`WebDatasetSource.skipped_shards`, the members read before the damage
  are kept.
* :class:`WebDatasetStream` streams the same tar shards without an index (LAION scale, 10^4-10^5
  shards): each process, and each grain worker in it, reads whole shards of its own in
  sequence ('stream': every shard once per epoch, shard order reshuffled per epoch; 'resampled':
  shards drawn with replacement, open_clip's ``--dataset-resampled``) through a seeded shuffle
  buffer. Opening it costs one listing (nothing for brace ranges) and its memory is the shard
  list plus the buffer, whatever the number of samples; its checkpointable state is the shard
  cursor, the byte offset of the next sample in the current shard and the positions of the
  buffered samples (re-read on restore).
* :class:`ArrayRecordSource` reads ArrayRecord shards written by :func:`write_array_record`
  (one msgpack-encoded record each), the format `vlm-jax data convert` produces.

Paths may be local or remote (``gs://...``) and may use brace ranges
(``shard-{00000..00099}.tar``) and globs. Listing and tar shards go through etils.epath
(gcsfs for ``gs://``); ArrayRecord files (ours and TFDS's) are read by array_record's own C++
reader, which opens ``gs://`` objects with riegeli's ``GcsReader`` (google-cloud-cpp, REST):
it uses Application Default Credentials and, for an emulator or another endpoint,
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` -- not gcsfs's ``STORAGE_EMULATOR_HOST``
(:func:`check_array_record_gcs`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
import grain
import msgpack
import numpy as np
from etils import epath

from input_pipeline import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Record = dict[str, Any]


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Expands ``{a..b}`` ranges (zero padding kept), commas and globs into sorted file paths.

    Raises:
        DataError: a pattern matches no file.
    """
    patterns = _split_patterns(patterns)
    out: list[str] = []
    for pattern in patterns:
        for expanded in _expand_braces(pattern):
            try:
                if any(c in expanded for c in "*?["):
                    path = epath.Path(expanded)
                    matches = sorted(str(p) for p in path.parent.glob(path.name))
                elif "://" in expanded and expanded != pattern:
                    # One remote stat per shard of a 40k-shard brace range takes minutes; a
                    # missing remote shard is reported (and skipped) when it is opened.
                    matches = [expanded]
                else:
                    matches = [expanded] if epath.Path(expanded).exists() else []
            except ImportError as e:  # fsspec names the missing backend (gcsfs, s3fs, ...)
                raise DataError(f"Cannot read {expanded!r}: {e} (`pip install -e \".[tpu]\"` "
                                "brings gcsfs for gs:// paths).") from e
            except FileNotFoundError:  # gcsfs: the bucket of a glob does not exist.
                matches, why = [], " (its bucket or directory does not exist)"
            except OSError as e:  # e.g. no permission to list the bucket, no network
                raise DataError(f"Cannot list {expanded!r} (from {pattern!r}): "
                                f"{type(e).__name__}: {e}; check the path and the credentials "
                                "(`gcloud storage ls` with the same account).") from e
            else:
                why = ""
            if not matches:
                raise DataError(f"No file matches {expanded!r} (from {pattern!r}){why}; check "
                                "the path in config.data.train_files.")
            out.extend(matches)
    return out


def _split_patterns(patterns: str | Sequence[str]) -> list[str]:
    """``'a,b c'`` -> ``['a', 'b', 'c']``; a sequence is returned as a list."""
    if isinstance(patterns, str):
        return [p for p in re.split(r"[,\s]+", patterns) if p]
    return list(patterns)


def check_array_record_gcs(path: str | os.PathLike) -> None:
    """Fails fast where array_record's C++ GCS client would hang on ``gs://`` ``path``.

    array_record reads ``gs://`` objects through google-cloud-cpp, which is pointed at an
    emulator (or any GCS-compatible endpoint) by ``CLOUD_STORAGE_EMULATOR_ENDPOINT``; it ignores
    ``STORAGE_EMULATOR_HOST`` (gcsfs's variable). With only the latter set, gcsfs lists and
    stats the emulator's objects while array_record goes to storage.googleapis.com. Against
    real GCS it takes Application Default Credentials; with none (no
    ``GOOGLE_APPLICATION_CREDENTIALS``, no ``gcloud auth application-default login``, not on a
    GCP VM) it asks the GCE metadata server for a token and retries for many minutes without
    an error. Both cases are refused here in well under a second (google-auth performs the same
    credentials search). Local paths pass.

    Raises:
        DataError: ``STORAGE_EMULATOR_HOST`` is set and ``CLOUD_STORAGE_EMULATOR_ENDPOINT``
            is not, or no Application Default Credentials are found.
    """
    if not os.fspath(path).startswith("gs://"):
        return
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator and not os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        raise DataError(
            f"Cannot read ArrayRecord data at {os.fspath(path)!r}: STORAGE_EMULATOR_HOST="
            f"{emulator} points gcsfs at a GCS emulator, but array_record's GCS client "
            "(google-cloud-cpp) reads CLOUD_STORAGE_EMULATOR_ENDPOINT and would go to "
            f"storage.googleapis.com. Set CLOUD_STORAGE_EMULATOR_ENDPOINT={emulator} too (or "
            "unset STORAGE_EMULATOR_HOST to read the real bucket).")
    if os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        return  # google-cloud-cpp uses anonymous credentials with an emulator.
    try:
        import google.auth  # pylint: disable=import-outside-toplevel
        import google.auth.exceptions  # pylint: disable=import-outside-toplevel
    except ImportError:  # google-auth comes with gcsfs; without it, let array_record try.
        return
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise DataError(
            f"Cannot read ArrayRecord data at {os.fspath(path)!r}: no Google credentials "
            f"({str(e).splitlines()[0]}). Run `gcloud auth application-default login`, set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run on a GCP VM "
            "whose service account can read the bucket.") from e


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


@dataclasses.dataclass(frozen=True)
class _Member:
    shard: int
    offset: int
    size: int


class WebDatasetSource:
    """Image-text pairs of webdataset tar shards (see module docstring)."""

    def __init__(self, patterns: str | Sequence[str]):
        self.paths = expand_paths(patterns)
        self.skipped_shards: list[tuple[str, str]] = []
        self._records: list[tuple[str, dict[str, _Member]]] = []
        # Indexing reads only the tar headers (seeking over the payloads) and is I/O bound:
        # shards are indexed by a thread pool, records kept in shard order (deterministic).
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            indexed = list(pool.map(self._index, range(len(self.paths)), self.paths))
        for records, skipped in indexed:
            self._records.extend(records)
            if skipped:
                self.skipped_shards.append(skipped)
        if not self._records:
            raise DataError(f"No samples in {len(self.paths)} tar shard(s) {self.paths[:3]}...; "
                            f"skipped shards: {self.skipped_shards[:3]}.")
        self._local = threading.local()

    @staticmethod
    def _index(shard: int, path: str):
        """(records of one shard, (path, reason) if it is damaged or else None)."""
        groups: dict[str, dict[str, _Member]] = {}
        order: list[str] = []
        skipped = None
        try:
            with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = os.path.basename(info.name)
                    key, _, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(info.name), key)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = _Member(shard, info.offset_data, info.size)
        except (tarfile.TarError, OSError, EOFError) as e:
            reason = f"{type(e).__name__}: {e}"
            skipped = (path, reason)
            log.warning("Skipping the rest of tar shard %s (%s); %d samples read before it.",
                        path, reason, len(order))
        return [(key, groups[key]) for key in order], skipped

    def __len__(self) -> int:
        return len(self._records)

    def _file(self, shard: int):
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
        if shard not in files:
            files[shard] = epath.Path(self.paths[shard]).open("rb")
        return files[shard]

    def _read(self, member: _Member | None) -> bytes | None:
        if member is None:
            return None
        path = self.paths[member.shard]
        if "://" in path:
            # One ranged GET of exactly the member's bytes (thread-safe, no handle to keep). A
            # gcsfs file object reads ahead (5 MiB blocks, prefetch tuned to sequential reads),
            # which the random access of a shuffled stream wastes; epath's open() takes no
            # block_size / cache_type, hence fsspec (epath's own gs:// backend) here.
            fs, fs_path = fsspec.core.url_to_fs(path)
            try:
                data = fs.cat_file(fs_path, start=member.offset, end=member.offset + member.size)
            except FileNotFoundError:  # removed since it was indexed
                return None
        else:
            f = self._file(member.shard)
            f.seek(member.offset)
            data = f.read(member.size)
        return data if len(data) == member.size else None  # truncated payload

    def __getitem__(self, index: int) -> Record:
        key, members = self._records[index]
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        return {
            "key": key,
            "image": self._read(members.get(image_ext)) if image_ext else None,
            "caption": self._read(members.get("txt")),
            "metadata": self._read(members.get("json")),
            "source": self.paths[members[next(iter(members))].shard],
        }

    def __getstate__(self):  # File handles are reopened in each grain worker.
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.paths)} shards, {len(self)} samples)"


def _sample_key(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, lower-case extension), as webdataset groups members:
    the key is the path up to the first dot of the base name."""
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), key), ext.lower()


def _record(key: str, members: dict[str, bytes], path: str) -> Record:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    return {"key": key, "image": members.get(image_ext) if image_ext else None,
            "caption": members.get("txt"), "metadata": members.get("json"), "source": path}


def iter_tar_samples(path: str, offset: int = 0) -> Iterator[tuple[int, Record, int | None]]:
    """Streams the samples of one webdataset tar shard, from the sample whose first header is at
    byte ``offset`` (0: the start), reading it front to back once (no index).

    Yields ``(start, record, next)``: the byte offset of the sample's first header, the record
    (as :class:`WebDatasetSource` returns it) and the offset of the next sample's first header
    (None after the last one), so a reader can stop after any sample and continue later from
    ``next``. The consecutive members sharing a key form a sample (img2dataset's layout).

    Raises:
        tarfile.TarError, OSError, EOFError: the shard is not a tar, or is damaged or cut at
            that point; the samples yielded before stay valid.
    """
    with epath.Path(path).open("rb") as f:
        if offset:
            f.seek(offset)
        # tarfile takes its offsets from the file's position when it is opened, so a shard
        # entered mid-way still reports absolute member offsets.
        with tarfile.open(fileobj=f, mode="r:") as tar:
            key, members, start = None, {}, None
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = _sample_key(info.name)
                if member_key != key:
                    if members:
                        yield start, _record(key, members, path), info.offset
                    key, members, start = member_key, {}, info.offset
                    tar.members.clear()  # tarfile keeps every TarInfo it read otherwise.
                # The payload is read straight from the file (tarfile's extractfile wraps
                # each member in a file object: a third of the time of a small sample).
                f.seek(info.offset_data)
                data = f.read(info.size)
                if len(data) != info.size:
                    raise tarfile.ReadError(f"unexpected end of data in member {info.name}")
                members[ext] = data
            if members:
                yield start, _record(key, members, path), None


def read_tar_sample(path: str, offset: int) -> Record | None:
    """The sample whose first header is at byte ``offset`` of tar shard ``path``, or None if it
    cannot be read any more (the shard was removed or changed)."""
    try:
        return next(iter_tar_samples(path, offset))[1]
    except (StopIteration, tarfile.TarError, OSError, EOFError):
        return None


class WebDatasetShards:
    """The tar shards of a webdataset corpus, listed but not opened: what
    :class:`WebDatasetStream` reads (``config.data.webdataset_mode`` 'stream' / 'resampled').

    Listing is one glob per pattern (brace ranges of remote shards are not even stat'ed), so
    opening 10^5 shards on GCS costs what opening 10 does.
    """

    def __init__(self, patterns: str | Sequence[str]):
        self.paths = expand_paths(patterns)
        self.skipped_shards: list[tuple[str, str]] = []  # found while streaming, not here

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.paths)} shards)"


STREAM_MODES = ("stream", "resampled")


def _stream_rng(*key: int) -> np.random.Generator:
    """A generator fixed by integers (seed, purpose, process, worker, counter): the stream's
    random choices are functions of where they are made, so a restored stream redraws them
    without any saved generator state."""
    return np.random.default_rng([int(k) for k in key])


class WebDatasetStream(grain.IterDataset):
    """Raw records of webdataset tar shards, streamed: this process's (and, under grain workers,
    this worker's) own shards read in sequence through a seeded shuffle buffer.

    Reader ``r = process_index * W + worker`` of ``R = process_count * W`` (``W`` grain
    workers, 1 without) reads:

    * ``mode='stream'``: epoch ``e``'s shard order is a permutation of all shards drawn from
      ``(seed, e)``; reader ``r`` reads every ``R``-th shard of it starting at ``r``, so in one
      epoch every shard is read exactly once by one reader. Epochs follow each other forever
      (the train loop stops at ``total_steps``).
    * ``mode='resampled'``: open_clip's ``--dataset-resampled``: each shard is drawn with
      replacement, uniformly, from ``(seed, epoch, r, draw)``; an epoch ends after
      ``samples_per_epoch / R`` samples read by the reader (0: one endless epoch; the rest of
      the shard being read is left, as open_clip's ``with_epoch`` does), and the next one
      draws from new seeds. Readers may read the same shard at the same time.

    Samples pass through a buffer of ``shuffle_buffer`` records (webdataset's ``shuffle``):
    once it is full, each record out is a uniformly chosen one (drawn from ``(seed, r,
    count // 1024)``),
    replaced by the next one read. The iterator state is the epoch, the shard cursor, the byte
    offset of the next sample in the current shard and the (shard, offset) of each buffered
    record, which are re-read on restore: the stream continues exactly, buffer included.

    A shard that cannot be opened or is damaged is skipped from that point on (the samples read
    before are kept), with a warning, and counted in ``SKIP_STATS`` as ``unreadable_shard``.
    """

    def __init__(self, paths: Sequence[str], *, mode: str = "stream", seed: int = 0,
                 shuffle_buffer: int = 1000, samples_per_epoch: int = 0,
                 process_index: int = 0, process_count: int = 1):
        super().__init__()
        if mode not in STREAM_MODES:
            raise DataError(f"Unknown webdataset stream mode {mode!r}; use one of "
                            f"{list(STREAM_MODES)}.")
        if not paths:
            raise DataError("WebDatasetStream needs at least one shard.")
        self.paths = list(paths)
        self.mode, self.seed = mode, seed
        self.shuffle_buffer, self.samples_per_epoch = max(1, shuffle_buffer), samples_per_epoch
        self.process_index, self.process_count = process_index, process_count
        self.worker_index, self.worker_count = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's hook for its worker processes: worker ``sl.start`` of ``sl.step`` reads its
        own shards (a stream cannot be sliced by element without reading every element)."""
        del sequential_slice
        self.worker_index, self.worker_count = sl.start or 0, sl.step or 1

    @property
    def readers(self) -> int:
        return self.process_count * self.worker_count

    @property
    def reader(self) -> int:
        return self.process_index * self.worker_count + self.worker_index

    def __iter__(self) -> "_WebDatasetStreamIterator":
        if self.mode == "stream" and len(self.paths) < self.readers:
            raise DataError(
                f"{len(self.paths)} tar shard(s) for {self.process_count} process(es) x "
                f"{self.worker_count} grain worker(s): each reads whole shards of its own, so "
                "there must be at least as many shards as readers. Lower "
                "config.data.worker_count, or use webdataset_mode='resampled' or 'indexed'.")
        return _WebDatasetStreamIterator(self)

    def __str__(self) -> str:
        return (f"WebDatasetStream({len(self.paths)} shards, mode={self.mode}, reader "
                f"{self.reader} of {self.readers})")


class _WebDatasetStreamIterator(grain.DatasetIterator):
    """The iterator of :class:`WebDatasetStream` (see there for its state)."""

    def __init__(self, ds: WebDatasetStream):
        super().__init__()
        self._ds = ds
        self._epoch, self._cursor, self._offset = 0, 0, 0
        self._read = 0  # samples read in this epoch (resampled epochs are counted in samples)
        self._emitted = 0
        self._buffer: list[tuple[int, int, Record]] = []  # (shard, offset, record)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this reader's shards)
        self._samples = None  # the generator over the current shard
        self._barren = 0  # shards in a row that gave no sample (all unreadable: an error)
        self._shard_samples = 0  # samples the current shard gave so far
        self._uniforms: tuple[int, np.ndarray] | None = None  # (block, its uniform draws)
        self._drawn: tuple[tuple[int, int], int] | None = None  # resampled: the current draw

    # -- the shard sequence -------------------------------------------------------------------

    def _shard(self) -> int | None:
        """The shard at the cursor, or None when this epoch has no more for this reader."""
        ds = self._ds
        if ds.mode == "resampled":
            quota = -(-ds.samples_per_epoch // ds.readers) if ds.samples_per_epoch else 0
            if quota and self._read >= quota:
                return None
            if self._drawn is None or self._drawn[0] != (self._epoch, self._cursor):
                shard = _stream_rng(ds.seed, 2, self._epoch, ds.reader, ds.readers,
                                    self._cursor).integers(len(ds.paths))
                self._drawn = ((self._epoch, self._cursor), int(shard))
            return self._drawn[1]
        if self._order is None or self._order[0] != self._epoch:
            perm = _stream_rng(ds.seed, 1, self._epoch).permutation(len(ds.paths))
            self._order = (self._epoch, perm[ds.reader::ds.readers])
        order = self._order[1]
        return int(order[self._cursor]) if self._cursor < len(order) else None

    def _next_epoch(self) -> None:
        self._epoch, self._cursor, self._offset, self._read = self._epoch + 1, 0, 0, 0
        self._close_shard()

    def _close_shard(self) -> None:
        if self._samples is not None:
            self._samples.close()
        self._samples = None

    def _read_one(self) -> tuple[int, int, Record]:
        """The next sample of this reader's shard sequence (moving across shards and epochs)."""
        from input_pipeline.transforms import SKIP_STATS  # pylint: disable=import-outside-toplevel

        while True:
            shard = self._shard()
            if shard is None:
                self._next_epoch()
                continue
            path = self._ds.paths[shard]
            if self._samples is None:
                self._samples = iter_tar_samples(path, self._offset)
            try:
                start, record, nxt = next(self._samples)
            except StopIteration:
                nxt, record = None, None
            except (tarfile.TarError, OSError, EOFError) as e:
                log.warning("Skipping the rest of tar shard %s from byte %d (%s: %s).", path,
                            self._offset, type(e).__name__, e)
                SKIP_STATS.record("unreadable_shard")
                nxt, record = None, None
            if nxt is None:  # the shard is done: the cursor moves on
                self._close_shard()
                self._cursor, self._offset = self._cursor + 1, 0
                self._barren = 0 if record is not None or self._shard_samples else self._barren + 1
                self._shard_samples = 0
                if self._barren > 10 * len(self._ds.paths) + 10:
                    raise DataError(
                        f"Reader {self._ds.reader} of {self._ds.readers} read no sample from "
                        f"{self._barren} shards in a row of {len(self._ds.paths)} tar shard(s) "
                        f"({self._ds.paths[:2]}...): they are unreadable or empty (see the "
                        "warnings above); check config.data.train_files.")
            else:
                self._offset = nxt
            if record is not None:
                self._read += 1
                self._shard_samples += 1
                return shard, start, record

    # -- the shuffle buffer ---------------------------------------------------------------------

    def __next__(self) -> Record:
        ds = self._ds
        while len(self._buffer) < ds.shuffle_buffer:
            self._buffer.append(self._read_one())
        j = self._uniform_index(len(self._buffer)) if len(self._buffer) > 1 else 0
        self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
        self._emitted += 1
        return self._buffer.pop()[2]

    def _uniform_index(self, n: int) -> int:
        """A uniform draw in ``[0, n)`` for output number ``self._emitted``: uniforms come in
        blocks of 1024 from ``(seed, reader, block)`` (one generator per sample costs 30 us)."""
        ds = self._ds
        block, i = divmod(self._emitted, 1024)
        if self._uniforms is None or self._uniforms[0] != block:
            self._uniforms = (block, _stream_rng(ds.seed, 3, ds.reader, ds.readers,
                                                 block).random(1024))
        return min(int(self._uniforms[1][i] * n), n - 1)

    def get_state(self) -> dict[str, Any]:
        ds = self._ds
        return {"mode": ds.mode, "reader": ds.reader, "readers": ds.readers,
                "shuffle_buffer": ds.shuffle_buffer, "epoch": self._epoch,
                "cursor": self._cursor, "offset": self._offset, "read": self._read,
                "emitted": self._emitted,
                "buffer": [[shard, offset] for shard, offset, _ in self._buffer]}

    def set_state(self, state: dict[str, Any]) -> None:
        ds = self._ds
        saved = (state["mode"], state["reader"], state["readers"], state["shuffle_buffer"])
        if saved != (ds.mode, ds.reader, ds.readers, ds.shuffle_buffer):
            raise DataError(
                f"The saved webdataset stream state is of mode {saved[0]!r}, reader {saved[1]} "
                f"of {saved[2]}, shuffle buffer {saved[3]}; this stream is mode {ds.mode!r}, "
                f"reader {ds.reader} of {ds.readers}, buffer {ds.shuffle_buffer}. Resume with "
                "the process count, config.data.worker_count and data.shuffle_buffer that "
                "wrote the checkpoint.")
        self._close_shard()
        self._epoch, self._cursor, self._offset = state["epoch"], state["cursor"], state["offset"]
        self._read, self._emitted = state["read"], state["emitted"]
        # The buffered records are read again from their positions (threads: on GCS each is one
        # small read, which a pool overlaps).
        positions = [(int(s), int(o)) for s, o in state["buffer"]]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            records = list(pool.map(lambda p: read_tar_sample(ds.paths[p[0]], p[1]), positions))
        missing = [ds.paths[s] for (s, _), r in zip(positions, records) if r is None]
        if missing:
            raise DataError(f"{len(missing)} buffered sample(s) of the checkpoint cannot be read "
                            f"again from {missing[:2]}: the shards changed since it was "
                            "written. Restore with the shards as they were.")
        self._buffer = [(s, o, r) for (s, o), r in zip(positions, records)]

    def close(self) -> None:
        self._close_shard()


class ArrayRecordSource:
    """Image-text pairs of ArrayRecord shards written by :func:`write_array_record`."""

    def __init__(self, patterns: str | Sequence[str]):
        from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel

        # Before gcsfs lists anything; one check covers all (same client and credentials).
        remote = [p for p in _split_patterns(patterns) if p.startswith("gs://")]
        if remote:
            check_array_record_gcs(remote[0])
        self.paths = expand_paths(patterns)
        try:
            self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
        except Exception as e:  # array_record raises several types for unreadable files.
            raise DataError(f"Cannot open ArrayRecord shards {self.paths[:3]}"
                            f"{'...' if len(self.paths) > 3 else ''}: {e}".rstrip()
                            + _gcs_hint(self.paths[0])) from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        record = msgpack.unpackb(self._source[index], raw=False)
        record.setdefault("source", "array_record")
        return record

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} samples)"


def _gcs_hint(path: str) -> str:
    if not path.startswith("gs://"):
        return ""
    return (" (array_record reads gs:// with Application Default Credentials; check that the "
            "objects exist and are readable, e.g. `gcloud storage ls`, or mount the bucket with "
            "gcsfuse / copy the shards to local disk and use those paths.)")


def write_array_record(records: Iterable[Record], path_prefix: str, num_shards: int = 1,
                       total: int | None = None) -> list[str]:
    """Writes records (dicts of bytes/str/None) round-robin into ``num_shards`` ArrayRecord
    files ``<path_prefix>-<i>-of-<n>.array_record``; returns their paths.

    Files are written under a temporary name and renamed when complete, so an interrupted
    conversion never leaves a shard that looks finished.
    """
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    paths = [f"{path_prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    epath.Path(paths[0]).parent.mkdir(parents=True, exist_ok=True)
    remote = "://" in path_prefix
    # ArrayRecordWriter (riegeli) writes local files only: shards for cloud storage are written
    # in a local temporary directory, then uploaded through epath.
    staging = tempfile.TemporaryDirectory(prefix="array_record_") if remote else None
    local = ([os.path.join(staging.name, os.path.basename(p)) for p in paths] if remote
             else paths)
    try:
        writers = [array_record_module.ArrayRecordWriter(p + ".tmp", "group_size:1")
                   for p in local]
        try:
            for i, record in enumerate(records):
                writers[i % num_shards].write(_pack_record(record))
        finally:
            for w in writers:
                w.close()
        for src, dst in zip(local, paths):
            if remote:  # An upload becomes visible only when complete.
                epath.Path(src + ".tmp").copy(dst, overwrite=True)
            else:
                os.replace(src + ".tmp", dst)
    finally:
        if staging is not None:
            staging.cleanup()
    return paths


# The fields a stored record keeps: an image-text pair, or (`vlm-jax data embed`) the locked
# image tower's embedding (float32 bytes) in place of the image.
RECORD_FIELDS = ("key", "image", "caption", "metadata", "image_emb")


def _pack_record(record: Record) -> bytes:
    """The stored form of a record: msgpack of its :data:`RECORD_FIELDS`."""
    keep = {k: v for k, v in record.items() if k in RECORD_FIELDS}
    return msgpack.packb(keep, use_bin_type=True)


def write_array_record_shard(records: Iterable[Record], path: str) -> int:
    """Writes ``records`` into the one ArrayRecord file ``path`` (local or ``gs://``); returns
    the number written. The file appears under ``path`` only once it is complete.

    * Local ``path``: written as ``.<name>.tmp`` in the same directory, fsync'ed, then renamed
      (``os.replace``: atomic on POSIX). The fsync makes a machine crash (a preempted VM) leave
      either the old state or the whole file, never a renamed but empty one.
    * ``gs://`` ``path``: array_record's writer (riegeli's ``FdWriter``) writes local files only
      (its reader has a GCS client, the writer none), so the shard is written to a local staging
      file (under ``$TMPDIR``) and then uploaded to ``path`` through etils.epath (gcsfs). GCS
      creates an object only when its upload completes -- the single request of a small upload
      or the finalising request of a resumable one -- so an interrupted upload leaves no object
      and a visible object is always whole: uploading straight to the final name is atomic. A
      temporary object plus "rename" would not be safer, and on GCS a rename is a copy and a
      delete (twice the writes).

    A temporary name carries the writer's process id, and each attempt first deletes the
    temporary files of earlier attempts at ``path`` (a killed run's), so they do not accumulate.
    Should an earlier writer still be running (a worker outliving its killed parent for the rest
    of its shard), it loses its file and fails; had it finished first, it would have installed
    a complete file with the same bytes (conversions are deterministic).

    Raises:
        Whatever ``records`` raises; the temporary file is removed and ``path`` left as it was.
    """
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    remote = "://" in path
    name = os.path.basename(path)
    if remote:
        import hashlib  # pylint: disable=import-outside-toplevel

        staging = os.path.join(tempfile.gettempdir(), "vlm_jax_array_record")
        os.makedirs(staging, exist_ok=True)
        digest = hashlib.sha1(path.encode()).hexdigest()[:16]
        tmp_dir, tmp_name = staging, f"{digest}-{name}.tmp"
    else:
        tmp_dir, tmp_name = os.path.dirname(path) or ".", f".{name}.tmp"
        os.makedirs(tmp_dir, exist_ok=True)
    for old in os.listdir(tmp_dir):  # earlier attempts' leftovers
        if old.startswith(tmp_name):
            try:
                os.remove(os.path.join(tmp_dir, old))
            except FileNotFoundError:
                pass
    tmp = os.path.join(tmp_dir, f"{tmp_name}.{os.getpid()}")
    n = 0
    try:
        # One record per chunk (random access reads one record). Uncompressed: a record is
        # mostly an encoded image, which riegeli's default brotli cannot shrink, at ~5 % of a
        # conversion's CPU time.
        writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1,uncompressed")
        try:
            for record in records:
                writer.write(_pack_record(record))
                n += 1
        finally:
            writer.close()
        if remote:
            epath.Path(tmp).copy(path, overwrite=True)
        else:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


class TfdsPairSource:
    """Image-text pairs from any prepared TFDS dataset, through ``tfds.data_source``.

    ``spec`` is ``'<name>[/<config>][:<version>]@<split>'`` (e.g. ``'coco_captions@train'``);
    ``image_key`` and ``caption_key`` name the features (a ``/`` path into nested features, e.g.
    ``'captions/text'``; a list of captions gives its first). Datasets without captions
    (``imagenet2012``, ``cifar10``) are captioned from their class names with ``caption_key``
    ``'label:<template>'``, e.g. ``'label:a photo of a {}.'``. Images may be stored as encoded
    bytes or decoded arrays; both go through the same checks.
    """

    def __init__(self, spec: str, data_dir: str | None = None, image_key: str = "image",
                 caption_key: str = "caption"):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        name, _, split = spec.partition("@")
        check_array_record_gcs(os.fspath(data_dir or os.environ.get("TFDS_DATA_DIR", "")))
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
            self._source = tfds.data_source(name, split=split or "train",
                                            data_dir=data_dir or None)
        except Exception as e:  # tfds raises many types for a missing dataset/split
            raise DataError(f"TFDS dataset {spec!r} is not prepared in {data_dir or '$TFDS_DATA_DIR'}"
                            f" ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Prepare it "
                            "with tfds (file_format='array_record') or fix config.data.train_files."
                            ) from e
        self.spec, self.image_key, self.caption_key = spec, image_key, caption_key
        self._names = None
        if caption_key.startswith("label:"):
            self._names = list(builder.info.features["label"].names)

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _get(record, path: str):
        for part in path.split("/"):
            record = record[part]
        return record

    def __getitem__(self, index: int) -> Record:
        import numpy as np  # pylint: disable=import-outside-toplevel

        r = self._source[index]
        image = self._get(r, self.image_key)
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()
        if self._names is not None:
            caption = self.caption_key[len("label:"):].format(
                self._names[int(r["label"])].replace("_", " "))
        else:
            caption = self._get(r, self.caption_key)
            if isinstance(caption, np.ndarray):
                caption = caption.reshape(-1)[0] if caption.size else None
        return {"key": f"{self.spec}/{index}", "image": image, "caption": caption,
                "metadata": None, "source": self.spec}

    def __repr__(self) -> str:
        return f"TfdsPairSource({self.spec}, {len(self)} samples)"


def open_source(kind: str, patterns: str | Sequence[str], **kwargs):
    """``kind`` ``'webdataset'``, ``'array_record'`` or ``'tfds'`` -> the source over
    ``patterns`` (for ``'tfds'``: ``'<name>@<split>'``, with ``data_dir`` / ``image_key`` /
    ``caption_key`` keyword arguments)."""
    if kind == "webdataset":
        return WebDatasetSource(patterns)
    if kind == "array_record":
        return ArrayRecordSource(patterns)
    if kind == "tfds":
        return TfdsPairSource(patterns, **kwargs)
    raise DataError(f"Unknown source kind {kind!r}; use 'webdataset', 'array_record' or "
                    "'tfds'.")
