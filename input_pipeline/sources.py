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
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec
import msgpack
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


def _pack_record(record: Record) -> bytes:
    """The stored form of a record: msgpack of its ``key``, ``image``, ``caption``, ``metadata``."""
    keep = {k: v for k, v in record.items() if k in ("key", "image", "caption", "metadata")}
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
