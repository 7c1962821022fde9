"""Text corpora for language-model pretraining: TFDS text datasets, JSON Lines and ArrayRecord
files, read through the same strided, checkpointable grain stream as every other pipeline.

Sources (random access: ``len`` and ``__getitem__``, so grain shuffles them globally and each
process reads only its own positions):

* :class:`TfdsTextSource`: a prepared TFDS dataset with a text feature (``'<name>@<split>'``,
  ``text_key`` a feature name or a ``/`` path into nested features), e.g. ``lm1b@train``;
* :class:`JsonlTextSource`: JSON Lines files, one JSON object per line with the document in
  ``text_key`` (``{"text": "..."}``, as C4, The Pile, RedPajama, FineWeb are distributed);
* :class:`ArrayRecordTextSource`: ArrayRecord files, one document per record: the UTF-8 text
  itself (``record_format='text'``) or a JSON object with ``text_key`` (``'json'``).

Paths are local or remote (``gs://``, through etils.epath / fsspec) with brace ranges
(``c4-train.{00000..01023}-of-01024.json``), commas and globs, as the webdataset sources
(:func:`input_pipeline.sources.expand_paths`).

A record reads as ``{'text': str | None, 'skip': reason | None}``: a line that is not JSON, an
object without ``text_key``, text that is not UTF-8 or is blank is not an error but a skipped
document, counted in :data:`input_pipeline.transforms.SKIP_STATS` with its reason.

Rows (:func:`create_text_iterator`): every document is ``[bos] pieces [eos]`` in the run's
sentencepiece tokenizer; row ``d`` of the global stream is the concatenation of the
``docs_per_row`` documents at positions ``[d * K, (d + 1) * K)`` of the shuffled stream, cut at
``seq_length`` (``docs_per_row=1``: one document per row, truncated) and padded when shorter.
``weights`` marks the prediction targets: text pieces and ``eos`` (not ``bos`` nor padding).

Why not grain's packers (``ConcatThenSplitIterDataset``, ``FirstFitPackIterDataset``): they
carry documents over from one row to the next, so a row depends on every row before it on the
same process and the global batch would depend on the process count; here a row is a function
of ``(seed, d)`` alone, so a run resumes exactly on any number of processes
(:class:`input_pipeline.pipeline.StreamIterator`). The cost: the end of a document longer than
its share of a row is not trained on. Choose ``docs_per_row`` near ``seq_length`` / the mean
document length. A skipped document leaves its share of the row to the others (or, with one
document per row, an all-padding row of weight 0) rather than being filtered out, which would
make the stream positions per-process.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import fsspec
import grain
import numpy as np
from etils import epath

from input_pipeline import DataError, pipeline, sources
from input_pipeline.tokenizers import SentencePieceTokenizer
from input_pipeline.transforms import SKIP_STATS

TEXT_SOURCES = ("tfds", "jsonl", "array_record")  # config.data.name of the text corpora
RECORD_FORMATS = ("text", "json")  # ArrayRecord: a record is the UTF-8 text, or a JSON object


def parse_text(value: Any, text_key: str | None = None) -> dict[str, Any]:
    """``{'text', 'skip'}`` of one raw document: bytes / str, or (``text_key`` set) a JSON
    object serialised as bytes / str holding the text at ``text_key``."""
    if value is None:
        return {"text": None, "skip": "missing_text"}
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else None
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"text": None, "skip": "text_not_utf8"}
    if text_key is not None:
        try:
            obj = json.loads(value)
        except ValueError:
            return {"text": None, "skip": "bad_json"}
        if not isinstance(obj, dict):
            return {"text": None, "skip": "bad_json"}
        value = obj.get(text_key)
        if not isinstance(value, str):
            return {"text": None, "skip": "missing_text"}
    if not str(value).strip():
        return {"text": None, "skip": "empty_text"}
    return {"text": str(value), "skip": None}


class _RangeReader:
    """Byte ranges of files by index: local files through kept handles (one per thread),
    remote ones through one ranged GET each (as :class:`sources.WebDatasetSource` reads)."""

    paths: list[str]

    def _read_range(self, file: int, start: int, end: int) -> bytes:
        path = self.paths[file]
        if "://" in path:
            fs, fs_path = fsspec.core.url_to_fs(path)
            return fs.cat_file(fs_path, start=start, end=end)
        local = self.__dict__.setdefault("_local", threading.local())
        files = getattr(local, "files", None)
        if files is None:
            files = local.files = {}
        if file not in files:
            files[file] = epath.Path(path).open("rb")
        f = files[file]
        f.seek(start)
        return f.read(end - start)

    def __getstate__(self):  # File handles are reopened in each grain worker.
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state


def _line_spans(path: str, chunk_size: int = 1 << 24) -> np.ndarray:
    """int64 [n, 2] ``(start, end)`` byte offsets of the non-blank lines of a file (without
    their ``\\n``), from one sequential read."""
    starts, ends = [], []
    offset, line_start = 0, 0
    with epath.Path(path).open("rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64)
            if len(newlines):
                newlines += offset
                starts.append(np.concatenate([[line_start], newlines[:-1] + 1]))
                ends.append(newlines)
                line_start = int(newlines[-1]) + 1
            offset += len(chunk)
    if offset > line_start:  # last line without a newline
        starts.append(np.asarray([line_start], np.int64))
        ends.append(np.asarray([offset], np.int64))
    if not starts:
        return np.zeros((0, 2), np.int64)
    spans = np.stack([np.concatenate(starts), np.concatenate(ends)], axis=1)
    # Blank lines (and a lone '\r') hold no document: left out of the index.
    return spans[spans[:, 1] - spans[:, 0] > 1]


class JsonlTextSource(_RangeReader):
    """Documents of JSON Lines files (see the module doc).

    Opening indexes every file (the byte span of each line, 16 bytes per document, read by a
    thread pool), as :class:`sources.WebDatasetSource` indexes tar headers; a corpus too large
    for that belongs in ArrayRecord files, whose index is in each file's footer.
    """

    def __init__(self, patterns: str | Sequence[str], text_key: str = "text"):
        self.paths = sources.expand_paths(patterns)
        self.text_key = text_key
        try:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                self._spans = list(pool.map(_line_spans, self.paths))
        except OSError as e:
            raise DataError(f"Cannot read JSON Lines file ({type(e).__name__}: {e}); check "
                            "config.data.train_files / eval_files.") from e
        self._ends = np.cumsum([len(s) for s in self._spans]).tolist()
        if not self._ends or not self._ends[-1]:
            raise DataError(f"No documents in the JSON Lines file(s) {self.paths[:3]}.")

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        file = bisect.bisect_right(self._ends, index)
        row = index - (self._ends[file - 1] if file else 0)
        start, end = self._spans[file][row]
        return parse_text(self._read_range(file, int(start), int(end)), self.text_key)

    def __repr__(self) -> str:
        return f"JsonlTextSource({len(self.paths)} files, {len(self)} documents)"


class ArrayRecordTextSource:
    """Documents of ArrayRecord files, one per record (see the module doc)."""

    def __init__(self, patterns: str | Sequence[str], text_key: str = "text",
                 record_format: str = "text"):
        from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel

        if record_format not in RECORD_FORMATS:
            raise DataError(f"config.data.record_format={record_format!r}: use one of "
                            f"{list(RECORD_FORMATS)}.")
        remote = [p for p in sources._split_patterns(patterns) if p.startswith("gs://")]  # pylint: disable=protected-access
        if remote:
            sources.check_array_record_gcs(remote[0])
        self.paths = sources.expand_paths(patterns)
        self.text_key = text_key if record_format == "json" else None
        try:
            self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
        except Exception as e:  # array_record raises several types for unreadable files.
            raise DataError(f"Cannot open ArrayRecord files {self.paths[:3]}: {e}") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return parse_text(self._source[index], self.text_key)

    def __repr__(self) -> str:
        return f"ArrayRecordTextSource({len(self.paths)} files, {len(self)} documents)"


class TfdsTextSource:
    """Documents of a prepared TFDS dataset: ``spec`` ``'<name>[/<config>][:<version>]@<split>'``
    in ``data_dir``, the text in feature ``text_key`` (a ``/`` path into nested features)."""

    def __init__(self, spec: str, data_dir: str | None = None, text_key: str = "text"):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        name, _, split = spec.partition("@")
        if not name or not split:
            raise DataError(f"TFDS text source {spec!r}: write '<name>@<split>', e.g. "
                            "'lm1b@train'.")
        sources.check_array_record_gcs(os.fspath(data_dir or
                                                 os.environ.get("TFDS_DATA_DIR", "")))
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
            self._source = builder.as_data_source(split)
        except Exception as e:  # tfds raises many types for a missing dataset/split
            raise DataError(f"TFDS dataset {spec!r} is not prepared in "
                            f"{data_dir or '$TFDS_DATA_DIR'} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}). Prepare it with tfds "
                            "(file_format='array_record') or fix config.data.train_files / "
                            "eval_files.") from e
        features = builder.info.features
        for part in text_key.split("/"):
            if not hasattr(features, "keys") or part not in features.keys():
                raise DataError(f"TFDS dataset {name} has no text feature {text_key!r} "
                                f"(config.data.text_key); its features: {builder.info.features}")
            features = features[part]
        self.spec, self.text_key = spec, text_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        for part in self.text_key.split("/"):
            record = record[part]
        return parse_text(record)

    def __repr__(self) -> str:
        return f"TfdsTextSource({self.spec}, {len(self)} documents)"


def open_text_source(kind: str, files: str | Sequence[str], *, text_key: str = "text",
                     data_dir: str | None = None, record_format: str = "text"):
    """``kind`` (``config.data.name``: ``'tfds'``, ``'jsonl'`` or ``'array_record'``) -> the
    text source over ``files`` (``'<name>@<split>'`` for TFDS)."""
    if kind == "tfds":
        return TfdsTextSource(files, data_dir=data_dir, text_key=text_key)
    if kind == "jsonl":
        return JsonlTextSource(files, text_key=text_key)
    if kind == "array_record":
        return ArrayRecordTextSource(files, text_key=text_key, record_format=record_format)
    raise DataError(f"Unknown text source {kind!r}; use one of {list(TEXT_SOURCES)}.")


def document_ids(text: str, tokenizer: SentencePieceTokenizer) -> tuple[list[int], list[float]]:
    """``([bos] pieces [eos], weights)`` of one document: every piece and eos is a target."""
    pieces = tokenizer._sp.encode(text)  # pylint: disable=protected-access
    return ([tokenizer.bos_id, *pieces, tokenizer.eos_id], [0.0] + [1.0] * (len(pieces) + 1))


class MakeTextRow(grain.transforms.Map):
    """``docs_per_row`` records -> ``{'tokens' int32 [T], 'weights' float32 [T]}`` (see the
    module doc); counts every document in :data:`SKIP_STATS` (``count``)."""

    def __init__(self, tokenizer: SentencePieceTokenizer, seq_length: int, count: bool = True):
        self.tokenizer, self.seq_length, self.count = tokenizer, seq_length, count

    def map(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        tokens = np.full((self.seq_length,), self.tokenizer.pad_id, np.int32)
        weights = np.zeros((self.seq_length,), np.float32)
        n = 0
        for record in records:
            if self.count:
                SKIP_STATS.record(record["skip"])
            if record["skip"] is not None or n >= self.seq_length:
                continue
            ids, w = document_ids(record["text"], self.tokenizer)
            k = min(len(ids), self.seq_length - n)
            tokens[n:n + k], weights[n:n + k] = ids[:k], w[:k]
            n += k
        return {"tokens": tokens, "weights": weights}


def create_text_iterator(source, *, tokenizer: SentencePieceTokenizer, seq_length: int,
                         global_batch_size: int, seed: int, docs_per_row: int = 1,
                         process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                         shuffle: bool = True) -> pipeline.StreamIterator:
    """Batches ``{'tokens' int32 [B, T], 'weights' float32 [B, T]}`` of a text source for this
    process (``B = global_batch_size // process_count``, ``T = seq_length``).

    Row ``d`` of the global stream is made of the documents at positions ``[d * K, (d + 1) *
    K)`` (``K = docs_per_row``) of the source shuffled with ``seed`` (reshuffled each epoch;
    ``shuffle=False``: in order, for held-out text), so its contents depend on ``(seed, d)``
    only and process ``i`` of ``n`` builds rows ``d % n == i``: the global batches are those of
    one process, and a checkpoint resumes on any process count
    (:class:`pipeline.StreamIterator`).
    """
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                        f"process count {process_count}.")
    if docs_per_row < 1:
        raise DataError(f"config.data.docs_per_row={docs_per_row} must be >= 1.")
    if len(source) < docs_per_row:
        raise DataError(f"{source!r} has {len(source)} documents, fewer than docs_per_row="
                        f"{docs_per_row}.")
    ds = grain.MapDataset.source(source)
    ds = (ds.shuffle(seed=seed) if shuffle else ds).repeat()
    ds = ds.batch(docs_per_row, drop_remainder=True, batch_fn=list)
    ds = ds.map(MakeTextRow(tokenizer, seq_length))

    def build(start: int) -> grain.DatasetIterator:
        # Batched before the iterator (as the shapes documents): with grain workers each worker
        # makes whole batches, so batch t is this process's share of global batch t.
        part = ds[start + process_index::process_count].batch(
            global_batch_size // process_count, drop_remainder=True)
        return pipeline._iterate(part.to_iter_dataset(pipeline._read_options()),  # pylint: disable=protected-access
                                 worker_count)

    return pipeline.StreamIterator(build, global_batch_size=global_batch_size,
                                   process_index=process_index, process_count=process_count)


def load_held_out(source, *, tokenizer: SentencePieceTokenizer, seq_length: int,
                  max_rows: int, docs_per_row: int = 1) -> dict[str, np.ndarray]:
    """The first ``max_rows`` rows of a held-out source, in order: ``{'documents' int32
    [N, T], 'weights' float32 [N, T]}`` (the ``lm_loss`` evaluator's data), ``N = min(max_rows,
    len(source) // docs_per_row)``. Skipped documents are not counted in :data:`SKIP_STATS`
    (those are the training stream's)."""
    n = min(max_rows, len(source) // docs_per_row)
    if n < 1:
        raise DataError(f"Held-out {source!r} has {len(source)} documents, fewer than one row "
                        f"of docs_per_row={docs_per_row}.")
    make = MakeTextRow(tokenizer, seq_length, count=False)
    rows = [make.map([source[i] for i in range(r * docs_per_row, (r + 1) * docs_per_row)])
            for r in range(n)]
    return {"documents": np.stack([r["tokens"] for r in rows]),
            "weights": np.stack([r["weights"] for r in rows])}
