"""Connects ``config.data`` to the grain pipelines of ``input_pipeline``."""

from __future__ import annotations

import dataclasses
import tarfile
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

from input_pipeline import DataError, pipeline, sources
from input_pipeline.shapes import builder as shapes_builder
from input_pipeline.transforms import MISSING_FIELD as _MISSING_FIELD
from vlm_jax.config import ConfigError


SOURCES = ("webdataset", "array_record", "tfds")  # config.data.name for raw image-text data
# <workdir>/tokenizer/: a copy of the run's tokenizer file (the shapes captions model lives in
# the dataset's directory), so that the workdir alone serves inference (vlm_jax.load, caption).
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class Data:
    """The prepared dataset of a run: train iterator and tokenizer (the evaluation data of
    ``config.evals`` is loaded by :mod:`vlm_jax.evaluation`)."""

    config: ConfigDict
    data_dir: str
    tokenizer: Any
    source: Any = None  # a raw image-text source (webdataset / ArrayRecord), else None

    def train_iterator(self):
        """This process's share of the training stream (checkpointable grain iterator)."""
        d = self.config.data
        if isinstance(self.source, sources.WebDatasetShards):  # webdataset_mode stream/resampled
            return pipeline.create_webdataset_stream_iterator(
                self.source, tokenizer=self.tokenizer, global_batch_size=self.config.batch_size,
                seed=self.config.seed, image_size=self.config.model.image.image_size,
                mode=d.webdataset_mode, shuffle_buffer=d.shuffle_buffer,
                samples_per_epoch=d.samples_per_epoch, process_index=jax.process_index(),
                process_count=jax.process_count(), worker_count=d.worker_count,
                min_side=d.min_side, filters=sample_filters(self.config))
        if self.source is not None:
            return pipeline.create_pair_iterator(
                self.source, tokenizer=self.tokenizer, global_batch_size=self.config.batch_size,
                seed=self.config.seed, image_size=self.config.model.image.image_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                worker_count=d.worker_count, min_side=d.min_side,
                filters=sample_filters(self.config))
        return pipeline.create_train_iterator(
            data_dir=self.data_dir, dataset=d.name, config_name=d.config_name, split="train",
            global_batch_size=self.config.batch_size, seed=self.config.seed,
            context_length=self.config.model.text.context_length,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=d.worker_count, image_size=self.config.model.image.image_size)



@dataclasses.dataclass
class DocumentData:
    """Documents for the language model (text only) and Flamingo (with images); same interface
    as :class:`Data`. ``config.data.name``: ``'shapes'``, the interleaved shapes documents
    (:mod:`input_pipeline.interleaved`); ``'tfds'`` / ``'jsonl'`` / ``'array_record'``, a text
    corpus for the language model (:mod:`input_pipeline.text`); ``'webdataset'``, interleaved
    web documents in the OBELICS or MMC4 layout for Flamingo. ``source``: the opened training
    source of the latter (None for shapes, and for ``vlm-jax eval``).

    ``lm``: the language model's config (its vocabulary and ``max_length``); ``image_size``:
    the side of the images of multimodal documents, None for text only."""

    config: ConfigDict
    data_dir: str
    tokenizer: Any
    lm: Any
    image_size: int | None = None
    source: Any = None

    @property
    def multimodal(self) -> bool:
        return self.image_size is not None

    @property
    def prompt_format(self):
        """Flamingo's ``<image>`` / ``<|endofchunk|>`` ids (after the LM's vocabulary) and how
        its prompts are written."""
        from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

        vocab = self.lm.vocab_size
        return interleaved.PromptFormat(self.tokenizer, vocab, vocab + 1)

    def _document_kwargs(self) -> dict:
        d = self.config.data
        kw = dict(data_dir=self.data_dir, config_name=d.config_name, tokenizer=self.tokenizer,
                  max_length=self.seq_length, max_images=document_max_images(self.config))
        if self.multimodal:
            fmt = self.prompt_format
            kw.update(image_id=fmt.image_id, eoc_id=fmt.eoc_id, image_size=self.image_size)
        return kw

    @property
    def seq_length(self) -> int:
        """Training sequence length: ``config.data.seq_length`` (0 = the LM's max_length)."""
        return document_length(self.config, self.lm)

    def train_iterator(self):
        """This process's share of the training documents (checkpointable grain iterator)."""
        from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

        if self.config.data.name != "shapes":
            return self._source_iterator()
        return interleaved.create_document_iterator(
            split="train", global_batch_size=self.config.batch_size, seed=self.config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=self.config.data.worker_count,
            docs_per_row=self.config.data.docs_per_row, **self._document_kwargs())

    # -- Sources other than shapes: text corpora (LM), interleaved web documents (Flamingo). --

    def _source_iterator(self):
        """The training iterator of ``self.source`` (see :func:`_prepare_document_source`)."""
        from input_pipeline import interleaved, text  # pylint: disable=import-outside-toplevel

        d = self.config.data
        if self.source is None:
            raise DataError("The training data was not opened (prepare(config, for_eval=True)).")
        kw = self._document_kwargs()
        stream = dict(global_batch_size=self.config.batch_size, seed=self.config.seed,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      worker_count=d.worker_count)
        if d.name in text.TEXT_SOURCES:
            return text.create_text_iterator(self.source, tokenizer=self.tokenizer,
                                             seq_length=kw["max_length"],
                                             docs_per_row=d.docs_per_row, **stream)
        return interleaved.create_webdataset_document_iterator(
            self.source, tokenizer=self.tokenizer, max_length=kw["max_length"],
            max_images=kw["max_images"], image_id=kw["image_id"], eoc_id=kw["eoc_id"],
            image_size=kw["image_size"], min_side=d.min_side,
            min_similarity=d.min_image_similarity, **stream)

    def check_held_out(self, key: str) -> None:
        """Checks that ``config.data.eval_files`` (the held-out text of a text corpus) can be read,
        without reading a document; ``key``: the evaluation entry that reads it, for messages.

        Raises:
            ConfigError: the run has no text corpus or no ``eval_files``.
            DataError: a file, or the TFDS dataset / split / text feature, is missing.
        """
        d = self.config.data
        if d.name not in TEXT_DOCUMENT_SOURCES:
            raise ConfigError(
                f"{key}.dataset='eval_files' reads config.data.eval_files of a text corpus "
                f"(config.data.name one of {list(TEXT_DOCUMENT_SOURCES)}); this run's data is "
                f"{d.name!r}: use dataset='shapes'.")
        if not d.eval_files:
            raise ConfigError(
                f"{key} needs held-out text: set config.data.eval_files (for data.name="
                f"{d.name!r}: " + ("'<name>@<split>', e.g. 'lm1b@test'" if d.name == "tfds" else
                                   "files of the same kind as train_files") + ").")
        if d.name == "tfds":  # DataError naming a missing dataset, split or text feature
            _open_text(d, d.eval_files)
        else:
            sources.expand_paths(d.eval_files)  # DataError naming a missing file

    def held_out_text(self, key: str, max_rows: int) -> dict:
        """``config.data.eval_files`` as ``lm_loss`` rows (``documents``, ``weights``), in file
        order, at most ``max_rows`` rows packed as the training rows are."""
        from input_pipeline import text  # pylint: disable=import-outside-toplevel

        self.check_held_out(key)
        d = self.config.data
        source = _open_text(d, d.eval_files)
        return text.load_held_out(source, tokenizer=self.tokenizer, seq_length=self.seq_length,
                                  max_rows=max_rows, docs_per_row=d.docs_per_row)


def _open_text(d: ConfigDict, files: str):
    from input_pipeline import text  # pylint: disable=import-outside-toplevel

    return text.open_text_source(d.name, files, text_key=d.text_key,
                                 data_dir=d.data_dir or None, record_format=d.record_format)


def document_length(config: ConfigDict, lm: Any) -> int:
    """Training sequence length of documents: ``config.data.seq_length`` (0 = the language
    model's ``max_length``)."""
    return config.data.seq_length or lm.max_length


def document_max_images(config: ConfigDict) -> int:
    """Image slots per multimodal document row: ``config.data.max_images``."""
    return config.data.max_images


def prepare_documents(config: ConfigDict, *, lm: Any, image_size: int | None = None,
                      for_eval: bool = False) -> DocumentData:
    """Documents for the language model ``lm`` (its config), with images of side ``image_size``
    (None: text only): the interleaved shapes documents (built if needed, with the shapes LM
    tokenizer), a text corpus or web documents (``config.data.name``, see
    :func:`_prepare_document_source`). ``for_eval``: the training files are not opened."""
    from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

    d = config.data
    if sample_filters(config).active:
        raise ConfigError("config.data.filters apply to image-text pairs (CLIP, SigLIP, CoCa), not "
                          "to documents (LM, Flamingo: see data.min_image_similarity); unset them.")
    if d.seq_length > lm.max_length:
        raise ConfigError(f"config.data.seq_length={d.seq_length} exceeds the language model's "
                          f"max_length={lm.max_length}.")
    if d.name != "shapes":  # The shapes dataset is built only when it is the data.
        return _prepare_document_source(config, lm, image_size, for_eval)
    data_dir = d.data_dir or shapes_builder.default_data_dir()
    shapes_builder.prepare(data_dir, config=d.config_name, num_train=d.num_train or None,
                           process_index=jax.process_index())
    tokenizer = interleaved.lm_tokenizer(lm.max_length)
    if tokenizer.vocab_size > lm.vocab_size:
        raise ConfigError(f"The language model's vocab_size={lm.vocab_size} is smaller than the "
                          f"shapes LM tokenizer's vocabulary ({tokenizer.vocab_size}).")
    return DocumentData(config, str(data_dir), tokenizer, lm, image_size)


TEXT_DOCUMENT_SOURCES = ("tfds", "jsonl", "array_record")  # data.name: the LM's text corpora
WEB_DOCUMENT_SOURCES = ("webdataset",)  # data.name: Flamingo's interleaved web documents


def _prepare_document_source(config: ConfigDict, lm: Any, image_size: int | None,
                             for_eval: bool) -> DocumentData:
    """A text corpus (language model) or interleaved web documents (Flamingo): the run's
    tokenizer (``config.data.tokenizer``, default the shapes LM tokenizer) and, unless
    ``for_eval``, the opened training source (``config.data.train_files``)."""
    from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel
    from input_pipeline.tokenizers import SentencePieceTokenizer  # pylint: disable=C0415

    d = config.data
    data = DocumentData(config, d.data_dir, None, lm, image_size)
    kinds = WEB_DOCUMENT_SOURCES if data.multimodal else TEXT_DOCUMENT_SOURCES
    if d.name not in kinds:
        raise ConfigError(
            f"config.data.name={d.name!r}: " + (
                "Flamingo trains on interleaved documents: 'shapes' (embedded) or "
                "'webdataset' (tar shards of OBELICS / MMC4-layout documents)."
                if data.multimodal else
                "the language model trains on 'shapes' (embedded) or a text corpus: 'tfds' "
                "(train_files='<name>@<split>'), 'jsonl' or 'array_record' (train_files: "
                "paths, {a..b} ranges, globs)."))
    if not d.train_files and not for_eval:
        example = {"tfds": "lm1b@train", "jsonl": "gs://bucket/c4-{00000..01023}.jsonl",
                   "array_record": "gs://bucket/docs-*.array_record",
                   "webdataset": "gs://bucket/obelics-{00000..09999}.tar"}[d.name]
        raise ConfigError(f"config.data.name={d.name!r} needs config.data.train_files (e.g. "
                          f"{example!r}).")
    data.tokenizer = SentencePieceTokenizer(d.tokenizer or interleaved.LM_TOKENIZER_PATH,
                                            lm.max_length)
    tok = data.tokenizer
    if tok.vocab_size > lm.vocab_size:
        raise ConfigError(f"The language model's vocab_size={lm.vocab_size} is smaller than the "
                          f"vocabulary of config.data.tokenizer={d.tokenizer!r} "
                          f"({tok.vocab_size}).")
    if (tok.bos_id, tok.eos_id, tok.pad_id) != (lm.bos_id, lm.eos_id, lm.pad_id):
        raise ConfigError(f"config.data.tokenizer={d.tokenizer!r} has bos/eos/pad ids "
                          f"{tok.bos_id}/{tok.eos_id}/{tok.pad_id}, the language model "
                          f"{lm.bos_id}/{lm.eos_id}/{lm.pad_id}: set the model's bos_id, eos_id, "
                          "pad_id to the tokenizer's.")
    if not for_eval:
        if data.multimodal:
            data.source = interleaved.WebDatasetDocumentSource(d.train_files)
            for path, reason in data.source.skipped_shards:
                print(f"Warning: skipped unreadable shard {path}: {reason}")
        else:
            data.source = _open_text(d, d.train_files)
    return data


def global_skip_stats() -> dict[str, int]:
    """The bad-sample counts of :data:`input_pipeline.transforms.SKIP_STATS` (``seen``,
    ``skipped``, ``skipped/<reason>``) summed over all processes.

    Every process gets the same numbers, so :func:`check_skipped` takes the same decision on all
    of them (a process whose shards hold the bad samples does not stop alone, leaving the others
    waiting in the next collective), and the logged ``data/*`` are those of the whole run.
    A collective: call it at the same steps on every process (the log steps).
    """
    from input_pipeline.transforms import DROP_REASONS, SKIP_STATS  # pylint: disable=C0415
    from vlm_jax import runtime  # pylint: disable=import-outside-toplevel

    keys = ("seen", "skipped", *(f"skipped/{r}" for r in SKIP_STATS.reasons()),
            *(f"dropped_images/{r}" for r in DROP_REASONS))
    local = SKIP_STATS.snapshot()
    unknown = [k for k in local if k not in keys]
    if unknown:  # A reason added to the pipeline but not to SKIP_REASONS would be lost.
        raise ValueError(f"SKIP_STATS has reasons {unknown} that SKIP_REASONS does not list "
                         "(nor SKIP_STATS.declare).")
    total = runtime.global_counts(local, keys)
    return {k: v for k, v in total.items()
            if v or not k.startswith(("skipped/", "dropped_images/"))}


def check_skipped(stats: dict[str, int], config: ConfigDict) -> None:
    """Stops the run when bad samples exceed ``config.data.max_skipped_fraction``.

    ``stats``: :func:`global_skip_stats` (the counts of all processes), so that every process
    raises the same error at the same step.

    Raises:
        DataError: naming the fraction, the threshold and the commonest reasons.
    """
    limit = config.data.max_skipped_fraction
    seen = stats.get("seen", 0)
    if seen < 100 or not limit or limit >= 1.0:
        return
    frac = stats.get("skipped", 0) / seen
    if frac > limit:
        reasons = sorted(((v, k.split("/", 1)[1]) for k, v in stats.items()
                          if k.startswith("skipped/")), reverse=True)
        listed = ", ".join(f"{r}: {n}" for n, r in reasons[:4])
        raise DataError(
            f"{100 * frac:.1f}% of the {seen} samples read (all processes) were skipped "
            f"({listed}), more than config.data.max_skipped_fraction={limit}. Check config.data.train_files "
            f"({config.data.train_files}) or raise the threshold.")


def sample_filters(config: ConfigDict):
    """``config.data.filters`` as :class:`input_pipeline.transforms.SampleFilters`.

    Raises:
        ConfigError: an unknown filter, a bad limit, or a metadata predicate that does not parse
            (named, with the form it should have).
    """
    from input_pipeline.transforms import SampleFilters  # pylint: disable=import-outside-toplevel

    values = dict(config.data.filters)
    values["metadata"] = list(values.get("metadata", []))
    try:
        return SampleFilters.create(**values)
    except ValueError as e:
        raise ConfigError(f"config.data.filters: {e}") from e


def check_metadata_fields(source, filters, num_samples: int = 8) -> None:
    """Fails when none of the first ``num_samples`` samples of ``source`` has a field that a
    metadata predicate of ``filters`` reads: a misspelt field (``clip_score`` for DataComp's
    ``clip_l14_similarity_score``) or shards written without ``--save_additional_columns``
    would skip every sample, and the run would wait for a batch that never comes.

    Raises:
        ConfigError: naming the predicate, the fields the samples do have, and the fix.
    """
    import json  # pylint: disable=import-outside-toplevel

    if not filters.metadata:
        return
    fields: set[str] = set()
    found: set[str] = set()
    if isinstance(source, sources.WebDatasetShards):  # streamed: the first shard's samples
        records = []
        try:
            for _, record, _ in sources.iter_tar_samples(source.paths[0]):
                records.append(record)
                if len(records) == num_samples:
                    break
        except (OSError, EOFError, tarfile.TarError):
            pass  # an unreadable shard is skipped and counted when the stream reaches it
        if not records:
            return
    else:
        records = [source[i] for i in range(min(num_samples, len(source)))]
    for record in records:
        raw = record.get("metadata")
        try:
            meta = raw if isinstance(raw, dict) else json.loads(raw) if raw else {}
        except ValueError:
            continue
        if not isinstance(meta, dict):
            continue
        fields.update(meta)
        found.update(p.field for p in filters.metadata if p.lookup(meta) is not _MISSING_FIELD)
    for predicate in filters.metadata:
        if predicate.field not in found:
            raise ConfigError(
                f"config.data.filters.metadata {predicate.text!r}: none of the first "
                f"{min(num_samples, len(source))} samples of {source!r} has a field "
                f"{predicate.field!r} in its .json metadata (they have "
                f"{sorted(fields) or 'no metadata'}); every sample would be skipped. Fix the "
                "field name, or write the shards with it (img2dataset --save_additional_columns)."
            )


# config.data.name of cached image embeddings (`vlm-jax data embed`; the LiT family) and the
# description `vlm-jax data embed` writes beside their shards.
EMBEDDINGS = "image_embeddings"
EMBEDDINGS_META = "embeddings.json"


@dataclasses.dataclass
class EmbeddingData:
    """Cached image embeddings (``config.data.name='image_embeddings'``, ``data.train_files``:
    the directory ``vlm-jax data embed`` wrote): the same interface as :class:`Data`, its
    tokenizer and evaluation data those of the data the embeddings were computed from.

    ``meta``: the directory's ``embeddings.json`` (the locked tower, its ``init_from`` sources,
    the source data, ``num_records``, ``shards``); ``records``: the opened shards (None for
    ``vlm-jax eval``)."""

    config: ConfigDict
    data_dir: str
    tokenizer: Any
    meta: dict
    directory: str
    records: Any = None
    source: Any = None  # no raw samples are decoded: nothing is skipped

    def train_iterator(self):
        """This process's share of the cached pairs (checkpointable grain iterator)."""
        if self.records is None:
            raise DataError("The cached embeddings were not opened (prepare_embeddings(config, "
                            "for_eval=True)).")
        return pipeline.create_embedding_iterator(
            self.records, tokenizer=self.tokenizer, global_batch_size=self.config.batch_size,
            seed=self.config.seed, dim=self.meta["dim"], process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=self.config.data.worker_count)


def read_embeddings_meta(directory: str) -> dict:
    """The ``embeddings.json`` of a directory written by ``vlm-jax data embed``.

    Raises:
        ConfigError: ``directory`` is not one (naming it and the command that writes one).
    """
    import json  # pylint: disable=import-outside-toplevel

    from etils import epath  # pylint: disable=import-outside-toplevel

    if not directory:
        raise ConfigError(f"config.data.name={EMBEDDINGS!r} needs config.data.train_files: the "
                          "directory `vlm-jax data embed --config ... --output DIR` wrote.")
    path = epath.Path(directory) / EMBEDDINGS_META
    if not path.exists():
        raise ConfigError(f"config.data.train_files={directory} holds no {EMBEDDINGS_META}: it is "
                          "not a directory of cached embeddings; write one with `vlm-jax data "
                          f"embed --config <the LiT config> --output {directory}`.")
    return json.loads(path.read_text())


def prepare_embeddings(config: ConfigDict, for_eval: bool = False) -> EmbeddingData:
    """Cached image embeddings of ``config.data.train_files`` (a directory written by
    ``vlm-jax data embed``). The tokenizer and the shapes evaluation data are those of the data
    the embeddings were computed from (recorded in its ``embeddings.json``), prepared as
    :func:`prepare` prepares them."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    directory = config.data.train_files
    meta = read_embeddings_meta(directory)
    origin = config.copy_and_resolve_references()
    with origin.unlocked():
        origin.data.name = meta["data"]["name"]
        origin.data.train_files = meta["data"]["train_files"]
    for key in ("config_name", "tokenizer", "eval_name"):
        if origin.data[key] != meta["data"][key]:
            raise ConfigError(f"config.data.{key}={origin.data[key]!r}, but the embeddings in "
                              f"{directory} were computed on data.{key}="
                              f"{meta['data'][key]!r}: set it to that.")
    base = prepare(origin, for_eval=True)
    records = None
    if not for_eval:
        records = sources.ArrayRecordSource(
            [str(epath.Path(directory) / name) for name in meta["shards"]])
        if len(records) != meta["num_records"]:
            raise DataError(f"{directory}: {len(records)} records, {EMBEDDINGS_META} says "
                            f"{meta['num_records']}; rewrite it with `vlm-jax data embed`.")
    return EmbeddingData(config, base.data_dir, base.tokenizer, meta, str(directory), records)


def latest_checkpoint_step(workdir: str) -> int | None:
    """The newest step directory of ``<workdir>/checkpoints`` (orbax names them by step; temporary
    directories of interrupted saves are not steps), None without one."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def _open(kind: str, files: str, d: ConfigDict, data_dir: str):
    if kind == "tfds":  # files = '<name>@<split>' of a dataset prepared in data_dir
        return sources.open_source(kind, files, data_dir=data_dir,
                                   image_key=d.image_key,
                                   caption_key=d.caption_key)
    return sources.open_source(kind, files)


WEBDATASET_MODES = ("indexed", *sources.STREAM_MODES)  # config.data.webdataset_mode


def _check_webdataset_mode(d: ConfigDict) -> bool:
    """Whether the run streams webdataset shards (``data.webdataset_mode`` 'stream' or
    'resampled'); checks the keys that mode reads.

    Raises:
        ConfigError: an unknown mode, a streamed mixture, a negative buffer or epoch size.
    """
    if d.webdataset_mode not in WEBDATASET_MODES:
        raise ConfigError(f"config.data.webdataset_mode={d.webdataset_mode!r}: use one of "
                          f"{list(WEBDATASET_MODES)}.")
    if d.shuffle_buffer < 0 or d.samples_per_epoch < 0:
        raise ConfigError(f"config.data.shuffle_buffer={d.shuffle_buffer} and "
                          f"samples_per_epoch={d.samples_per_epoch} must be >= 0.")
    if d.name != "webdataset" or d.webdataset_mode == "indexed":
        return False
    if d.mixture:
        raise ConfigError(f"config.data.webdataset_mode={d.webdataset_mode!r} reads "
                          "config.data.train_files; a mixture is read indexed (set "
                          "webdataset_mode='indexed', or list all shards in train_files).")
    if not d.train_files:
        raise ConfigError("config.data.name='webdataset' needs config.data.train_files (e.g. "
                          "'gs://bucket/laion400m/{00000..41407}.tar').")
    return True


def prepare(config: ConfigDict, for_eval: bool = False) -> Data:
    """The image-text data of a dual-encoder run (CLIP, SigLIP, CoCa; other families prepare
    theirs, e.g. :func:`prepare_documents`: ask ``families.get_family(config).make_data``).
    Builds the dataset if needed (process 0; others wait) and loads its tokenizer.

    ``config.data.name`` is ``'shapes'`` (the embedded dataset) or a raw image-text source,
    ``'webdataset'`` / ``'array_record'`` with ``config.data.train_files`` (paths, brace ranges,
    globs); those are evaluated on the shapes splits named by ``data.eval_name`` /
    ``data.config_name`` and tokenised with ``data.tokenizer`` (CLIP's BPE merges file
    ``bpe_simple_vocab_16e6.txt.gz`` or a sentencepiece ``.model``; default: the shapes
    tokenizer). ``for_eval``: the training data is not opened (``vlm-jax eval``).
    ``data.webdataset_mode`` 'stream' / 'resampled' lists the tar shards without indexing them
    (:class:`input_pipeline.sources.WebDatasetShards`; read by
    :func:`input_pipeline.pipeline.create_webdataset_stream_iterator`).
    """
    d = config.data
    if d.name == EMBEDDINGS:
        raise ConfigError(f"config.data.name={EMBEDDINGS!r} holds a locked image tower's "
                          "embeddings: it trains a LiT model (config.model.name='lit', "
                          "locked='image').")
    if d.name != "shapes" and d.name not in SOURCES:
        raise ConfigError(f"config.data.name={d.name!r}: use 'shapes' (embedded) or a source of "
                          f"image-text shards {list(SOURCES)} with config.data.train_files.")
    # A bad predicate fails here, before any shard is opened.
    if d.name not in SOURCES and sample_filters(config).active:
        raise ConfigError(f"config.data.filters apply to raw image-text shards (data.name one of "
                          f"{list(SOURCES)}); data.name={d.name!r} is not filtered: unset them.")
    data_dir = d.data_dir or shapes_builder.default_data_dir()
    source = None
    streamed = _check_webdataset_mode(d)
    if d.name in SOURCES and not for_eval:
        if streamed:  # Listed, not indexed: the stream opens each shard when it reaches it.
            source = sources.WebDatasetShards(d.train_files)
        elif d.mixture:  # [{'name': ..., 'train_files': ..., 'weight': ...}, ...]
            parts = []
            for i, part in enumerate(d.mixture):
                missing = {"name", "train_files", "weight"} - set(part)
                if missing or part["name"] not in SOURCES:
                    raise ConfigError(f"config.data.mixture[{i}] = {dict(part)}: needs name "
                                      f"(one of {list(SOURCES)}), train_files and weight.")
                parts.append((_open(part["name"], part["train_files"], d, data_dir),
                              float(part["weight"])))
            source = parts
        elif not d.train_files:
            raise ConfigError(f"config.data.name={d.name!r} needs config.data.train_files "
                              "(e.g. 'shards/train-{00000..00009}.tar') or config.data.mixture.")
        else:
            source = _open(d.name, d.train_files, d, data_dir)
        for src in (source if isinstance(source, list) else [source]):
            src = src[0] if isinstance(src, tuple) else src
            for path, reason in getattr(src, "skipped_shards", []):
                print(f"Warning: skipped unreadable shard {path}: {reason}")
            check_metadata_fields(src, sample_filters(config))
    if d.name in SOURCES and d.tokenizer:
        from input_pipeline.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel

        tokenizer = load_tokenizer(d.tokenizer, config.model.text.context_length)
    else:  # The tokenizer shipped with the shapes dataset: built only here, when it is needed.
        eval_name = d.eval_name if d.name in SOURCES else d.name
        shapes_builder.prepare(data_dir, config=d.config_name, num_train=d.num_train or None,
                               process_index=jax.process_index())
        tokenizer = pipeline.tokenizer_for(data_dir=data_dir, dataset=eval_name,
                                           config_name=d.config_name,
                                           context_length=config.model.text.context_length)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"config.model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}); set it to at least that.")
    return Data(config, str(data_dir), tokenizer, source)


def save_tokenizer(workdir: str | epath.Path, tokenizer: Any) -> None:
    """Copies the file ``tokenizer`` was read from (its ``path``) into ``<workdir>/tokenizer/``
    (:func:`run_tokenizer` reads it back); nothing for a tokenizer without a file."""
    path = getattr(tokenizer, "path", None)
    if not path:
        return
    src = epath.Path(path)
    dst = epath.Path(workdir) / TOKENIZER_DIR / src.name
    content = src.read_bytes()
    if dst.exists() and dst.read_bytes() == content:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(content)


def _saved_tokenizers(workdir) -> list[epath.Path]:
    saved = epath.Path(workdir) / TOKENIZER_DIR if workdir is not None else None
    return sorted(saved.iterdir()) if saved is not None and saved.is_dir() else []


def document_tokenizer(config: ConfigDict, lm: Any, workdir: str | epath.Path | None = None
                       ) -> Any:
    """The tokenizer of a language-model or Flamingo run (``lm``: its language model's config),
    for inference, as :func:`prepare_documents` loads it but without building or opening data:
    the copy in ``<workdir>/tokenizer/``, else ``config.data.tokenizer`` (a corpus run), else
    the shapes LM tokenizer, which ships with vlm_jax."""
    from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel
    from input_pipeline.tokenizers import SentencePieceTokenizer  # pylint: disable=C0415

    files = _saved_tokenizers(workdir)
    d = config.data
    path = (files[0] if files else d.tokenizer if d.name != "shapes" and d.tokenizer
            else interleaved.LM_TOKENIZER_PATH)
    return SentencePieceTokenizer(path, lm.max_length)


def run_tokenizer(config: ConfigDict, workdir: str | epath.Path | None = None) -> Any:
    """The caption tokenizer of an image-text run (CLIP, SigLIP, CoCa), for inference: what
    :func:`prepare` would load, without building or opening any dataset.

    In order: the copy in ``<workdir>/tokenizer/`` (written by ``vlm-jax train``), the file
    ``config.data.tokenizer`` names for raw shards (``clip_bpe`` ships with vlm_jax: converted
    OpenAI / open_clip models), the tokenizer of an already built shapes dataset; only a
    workdir written before runs kept their tokenizer, whose dataset is gone, builds the shapes
    dataset again (it is deterministic, and so is its tokenizer).

    Raises ConfigError when the tokenizer's vocabulary exceeds the model's.
    """
    from input_pipeline.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel

    d = config.data
    ctx = config.model.text.context_length
    files = _saved_tokenizers(workdir)
    if files:
        tokenizer = load_tokenizer(files[0], ctx)
    elif d.name in SOURCES and d.tokenizer:
        tokenizer = load_tokenizer(d.tokenizer, ctx)
    else:
        data_dir = d.data_dir or shapes_builder.default_data_dir()
        eval_name = d.eval_name if d.name in SOURCES else d.name
        try:
            tokenizer = pipeline.tokenizer_for(data_dir=data_dir, dataset=eval_name,
                                               config_name=d.config_name, context_length=ctx)
        except DataError:  # Neither kept nor built: rebuild the (deterministic) dataset.
            return prepare(config, for_eval=True).tokenizer
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"The tokenizer ({getattr(tokenizer, 'path', '?')}) has {tokenizer.vocab_size} "
            f"tokens, more than the model's config.model.text.vocab_size="
            f"{config.model.text.vocab_size}: ids past the model's table would be clamped. "
            "Tokenize with the model's own tokenizer.")
    return tokenizer
