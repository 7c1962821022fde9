"""Connects ``config.data`` to the grain pipelines of ``input_pipeline``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from input_pipeline import DataError, pipeline, sources
from input_pipeline.shapes import builder as shapes_builder
from vlm_jax.config import ConfigError


SOURCES = ("webdataset", "array_record", "tfds")  # config.data.name for raw image-text data
RETRIEVAL_DATASETS = ("coco_captions", "flickr30k", "coco")  # eval.dataset=tfds:<name>: captions


@dataclasses.dataclass
class Data:
    """The prepared dataset of a run: train iterator, eval split and tokenizer."""

    config: ConfigDict
    data_dir: str
    tokenizer: Any
    source: Any = None  # a raw image-text source (webdataset / ArrayRecord), else None

    def train_iterator(self):
        """This process's share of the training stream (checkpointable grain iterator)."""
        d = self.config.data
        if self.source is not None:
            return pipeline.create_pair_iterator(
                self.source, tokenizer=self.tokenizer, global_batch_size=self.config.batch_size,
                seed=self.config.seed, image_size=self.config.model.image.image_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                worker_count=d.worker_count, min_side=d.get("min_side", 8))
        return pipeline.create_train_iterator(
            data_dir=self.data_dir, dataset=d.name, config_name=d.config_name, split="train",
            global_batch_size=self.config.batch_size, seed=self.config.seed,
            context_length=self.config.model.text.context_length,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=d.worker_count)

    def eval_split(self) -> dict:
        """The evaluation data, in memory (images, tokens, labels, class names, templates).

        ``config.eval.dataset``: ``''`` for the run's own evaluation data (the shapes splits),
        ``'tfds:<name>'`` for any prepared TFDS dataset in ``config.eval.data_dir``:
        classification (imagenet2012, cifar10, ...) or captions (coco_captions: retrieval with
        several captions per image). Images are brought to the model's size, texts are
        tokenised with the run's tokenizer. With the ``linear_probe`` evaluator, also
        ``probe_train`` / ``probe_val`` (``eval.probe_examples`` training images).
        """
        e = self.config.eval
        out = self._split(e.split, e.max_examples or None)
        if "linear_probe" in e.evaluators and "label" in out:
            out["probe_train"], out["probe_val"] = self._probe_splits()
        return out

    def eval_keys(self) -> set[str]:
        """The keys :meth:`eval_split` returns, from the dataset's metadata alone (TFDS
        ``dataset_info.json`` / ``features.json``): no example is read or decoded. ``probe_train``
        is among them when the dataset has labels and the linear probe's splits.

        Raises:
            DataError: the dataset, ``config.eval.split`` or its image feature is missing
                (the message says how to prepare it).
        """
        from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

        e = self.config.eval
        probe = (e.get("probe_split", "train"), e.get("probe_val_split", "validation"))
        name = self._eval_dataset()
        if name is None:  # The run's own (shapes) evaluation data.
            d = self.config.data
            dataset = d.get("eval_name", d.name) if d.name != "shapes" else "shapes"
            builder = pipeline.split_builder(self.data_dir, dataset, d.config_name, [e.split])
            keys = pipeline.eval_split_keys(builder)
        else:
            builder = eval_data.open_builder(name, [e.split], e.get("data_dir") or None)
            if name.split("/")[0] in RETRIEVAL_DATASETS:
                keys = eval_data.retrieval_keys(builder)
                if "caption" in keys:
                    keys |= {"text", "captions"}
            else:
                keys = eval_data.classification_keys(builder)
        if "label" in keys and all(s.split("[", 1)[0] in builder.info.splits for s in probe):
            keys |= {"probe_train", "probe_val"}
        return keys

    def _eval_dataset(self) -> str | None:
        """The TFDS name of ``config.eval.dataset``, or None for the run's own evaluation data."""
        dataset = self.config.eval.get("dataset", "") or ""
        if dataset.startswith("tfds:"):
            return dataset[len("tfds:"):]
        if dataset:
            raise ConfigError(f"config.eval.dataset={dataset!r}: use '' (the run's own evaluation "
                              "data) or 'tfds:<name>' (a prepared TFDS dataset, e.g. "
                              "tfds:imagenet2012, tfds:cifar10, tfds:coco_captions).")
        return None

    def _split(self, split: str, max_examples: int | None) -> dict:
        """One split of ``config.eval.dataset`` (the run's own shapes data, or ``tfds:<name>``)."""
        name = self._eval_dataset()
        if name is not None:
            return self._tfds_split(name, split, max_examples)
        return self._shapes_split(split, max_examples)

    def _shapes_split(self, split: str, max_examples: int | None) -> dict:
        d = self.config.data
        size = self.config.model.image.image_size
        name = d.get("eval_name", d.name) if d.name != "shapes" else "shapes"
        native = int(str(d.config_name).removesuffix("px"))
        out = pipeline.load_eval_split(
            data_dir=self.data_dir, dataset=name, config_name=d.config_name, split=split,
            context_length=self.config.model.text.context_length, max_examples=max_examples,
            image_size=size if size != native or d.name in SOURCES else None)
        if d.get("tokenizer"):  # The run's tokenizer, not the one shipped with the dataset.
            out["text"] = self.tokenizer.encode(out["caption"])
        return out

    def _tfds_split(self, name: str, split: str, max_examples: int | None) -> dict:
        from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

        e = self.config.eval
        kw = dict(split=split, data_dir=e.get("data_dir") or None,
                  image_size=self.config.model.image.image_size, max_examples=max_examples)
        if name.split("/")[0] in RETRIEVAL_DATASETS:
            out = eval_data.load_tfds_retrieval(name, **kw)
            out["text"] = self.tokenizer.encode(out["caption"])
            out["captions"] = _captions_per_image(out)  # references of the captioning evaluator
            return out
        return eval_data.load_tfds_classification(name, **kw)

    def _probe_splits(self) -> tuple[dict, dict]:
        """Training and validation images for the linear probe (features are frozen)."""
        e = self.config.eval
        n = e.get("probe_examples", 5000) or None
        splits = (e.get("probe_split", "train"), e.get("probe_val_split", "validation"))
        train, val = (self._split(split, n) for split in splits)
        return ({"image": train["image"], "label": train["label"]},
                {"image": val["image"], "label": val["label"]})

    def batch_shapes(self) -> dict[str, tuple]:
        """Global batch shapes of the training batches."""
        b = self.config.batch_size
        size = self.config.model.image.image_size
        return {"image": (b, size, size, 3), "text": (b, self.config.model.text.context_length)}


@dataclasses.dataclass
class DocumentData:
    """Documents for the language model (text only) and Flamingo (with images); same interface
    as :class:`Data`. ``config.data.name``: ``'shapes'``, the interleaved shapes documents
    (:mod:`input_pipeline.interleaved`); ``'tfds'`` / ``'jsonl'`` / ``'array_record'``, a text
    corpus for the language model (:mod:`input_pipeline.text`); ``'webdataset'``, interleaved
    web documents in the OBELICS or MMC4 layout for Flamingo. ``source``: the opened training
    source of the latter (None for shapes, and for ``vlm-jax eval``)."""

    config: ConfigDict
    data_dir: str
    tokenizer: Any
    source: Any = None

    @property
    def multimodal(self) -> bool:
        return self.config.model.name == "flamingo"

    @property
    def prompt_format(self):
        """Flamingo's ``<image>`` / ``<|endofchunk|>`` ids (after the LM's vocabulary) and how
        its prompts are written."""
        from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

        vocab = _lm_config(self.config).vocab_size
        return interleaved.PromptFormat(self.tokenizer, vocab, vocab + 1)

    def _document_kwargs(self) -> dict:
        d = self.config.data
        kw = dict(data_dir=self.data_dir, config_name=d.config_name, tokenizer=self.tokenizer,
                  max_length=self.seq_length, max_images=d.get("max_images", 5))
        if self.multimodal:
            fmt = self.prompt_format
            kw.update(image_id=fmt.image_id, eoc_id=fmt.eoc_id,
                      image_size=self.config.model.vision.image_size)
        return kw

    @property
    def seq_length(self) -> int:
        """Training sequence length: ``config.data.seq_length`` (0 = the LM's max_length)."""
        return document_batch(self.config)["tokens"][0][1]

    def train_iterator(self):
        """This process's share of the training documents (checkpointable grain iterator)."""
        from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

        if self.config.data.name != "shapes":
            return self._source_iterator()
        return interleaved.create_document_iterator(
            split="train", global_batch_size=self.config.batch_size, seed=self.config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=self.config.data.worker_count,
            docs_per_row=self.config.data.get("docs_per_row", 1), **self._document_kwargs())

    def eval_split(self) -> dict:
        """``config.eval.split`` of shapes in memory (images, questions, answers, captions) and,
        for Flamingo, the in-context pool: ``eval.fewshot_pool`` records of the train split;
        for the language model, held-out text documents (``documents``, ``weights``): of the
        shapes split, or of ``config.data.eval_files`` for a text corpus (``{}`` without)."""
        from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

        e, d = self.config.eval, self.config.data
        name = self._eval_dataset()
        if name is not None:
            return self._tfds_captions(name)
        if d.name != "shapes":
            return self._held_out_text() if e.evaluators else {}
        if self.multimodal:
            size = self.config.model.vision.image_size
            native = int(str(d.config_name).removesuffix("px"))
            kw = dict(data_dir=self.data_dir, dataset="shapes", config_name=d.config_name,
                      context_length=8, image_size=size if size != native else None)
            out = pipeline.load_eval_split(split=e.split, max_examples=e.max_examples or None,
                                           **kw)
            pool = pipeline.load_eval_split(split="train",
                                            max_examples=e.get("fewshot_pool", 1000), **kw)
            out["pool"] = {k: pool[k] for k in ("image", "question", "answer", "caption")}
            out["prompt_format"] = self.prompt_format
            return out
        it = interleaved.create_document_iterator(
            split=e.split, global_batch_size=min(256, e.max_examples or 256), seed=0,
            docs_per_row=self.config.data.get("docs_per_row", 1), **self._document_kwargs())
        batch = next(it)
        return {"documents": batch["tokens"], "weights": batch["weights"]}

    def eval_keys(self) -> set[str]:
        """The keys :meth:`eval_split` returns, from the dataset's metadata alone (TFDS
        ``dataset_info.json`` / ``features.json``): no document or image is read or decoded.

        Raises:
            DataError: the dataset or one of the splits it reads is missing.
        """
        from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

        e = self.config.eval
        name = self._eval_dataset()
        if name is None and self.config.data.name != "shapes":
            return self._held_out_keys()
        if name is not None:  # Flamingo on a TFDS captions dataset.
            builder = eval_data.open_builder(
                name, [e.split, e.get("fewshot_pool_split", "train")], e.get("data_dir") or None)
            if "caption" not in eval_data.retrieval_keys(builder):
                return {"image"}
            return {"image", "captions", "pool", "prompt_format"}
        splits = [e.split, "train"] if self.multimodal else [e.split]  # train: in-context pool
        builder = pipeline.split_builder(self.data_dir, "shapes", self.config.data.config_name,
                                         splits)
        if not self.multimodal:
            return {"documents", "weights"}
        keys = pipeline.eval_split_keys(builder)
        if {"question", "answer", "caption"} <= keys:
            keys |= {"pool", "prompt_format"}
        return keys

    def _eval_dataset(self) -> str | None:
        """The TFDS name of ``config.eval.dataset`` (Flamingo only, a captions dataset), or None
        for the shapes splits."""
        dataset = self.config.eval.get("dataset", "") or ""
        if self.multimodal and dataset.startswith("tfds:"):
            name = dataset[len("tfds:"):]
            if name.split("/")[0] not in RETRIEVAL_DATASETS:
                raise ConfigError(f"config.eval.dataset={dataset}: Flamingo's TFDS evaluation "
                                  f"reads captions datasets ({', '.join(RETRIEVAL_DATASETS)}).")
            return name
        if dataset:
            raise ConfigError(f"config.eval.dataset={dataset!r}: use '' (shapes) or, for "
                              "Flamingo, 'tfds:<captions dataset>' (e.g. tfds:coco_captions).")
        return None

    def _tfds_captions(self, name: str) -> dict:
        """A prepared TFDS captions dataset (``coco_captions``...) for few-shot captioning: the
        queries from ``eval.split``, the in-context pool (first caption of each image) from
        ``eval.fewshot_pool_split`` (default ``train``)."""
        from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

        e = self.config.eval
        kw = dict(data_dir=e.get("data_dir") or None,
                  image_size=self.config.model.vision.image_size)

        def load(split, n):
            raw = eval_data.load_tfds_retrieval(name, split=split, max_examples=n, **kw)
            return raw["image"], _captions_per_image(raw)

        images, captions = load(e.split, e.max_examples or None)
        pool_images, pool_captions = load(e.get("fewshot_pool_split", "train"),
                                          e.get("fewshot_pool", 1000))
        return {"image": images, "captions": captions,
                "pool": {"image": pool_images, "caption": [c[0] for c in pool_captions]},
                "prompt_format": self.prompt_format}

    def batch_shapes(self) -> dict[str, tuple]:
        return {k: shape for k, (shape, _) in document_batch(self.config).items()}

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
            image_size=kw["image_size"], min_side=d.get("min_side", 8),
            min_similarity=d.min_image_similarity, **stream)

    def _check_held_out(self) -> None:
        """Raises ConfigError when the evaluators of a run on a text corpus or on web documents
        have no data (see :meth:`_held_out_keys`)."""
        d = self.config.data
        if self.multimodal:
            raise ConfigError(
                f"config.data.name={d.name!r}: Flamingo's few-shot evaluators read "
                "config.eval.dataset='tfds:<captions dataset>' (e.g. tfds:coco_captions, with "
                "config.eval.data_dir); the shapes splits exist only with "
                "config.data.name='shapes'. Or set config.eval.evaluators=[].")
        if not d.eval_files:
            raise ConfigError(
                f"config.eval.evaluators={list(self.config.eval.evaluators)} need held-out "
                f"text: set config.data.eval_files (for data.name={d.name!r}: "
                + ("'<name>@<split>', e.g. 'lm1b@test'" if d.name == "tfds" else
                   "files of the same kind as train_files") + ") or config.eval.evaluators=[].")

    def _held_out_keys(self) -> set[str]:
        """:meth:`eval_keys` of a text corpus (no document is read) or of web documents."""
        self._check_held_out()
        d = self.config.data
        if d.name == "tfds":  # DataError naming a missing dataset, split or text feature
            _open_text(d, d.eval_files)
        else:
            sources.expand_paths(d.eval_files)  # DataError naming a missing file
        return {"documents", "weights"}

    def _held_out_text(self) -> dict:
        """``config.data.eval_files`` as the ``lm_loss`` evaluator's rows, in file order
        (``eval.max_examples`` rows, default 256)."""
        from input_pipeline import text  # pylint: disable=import-outside-toplevel

        self._check_held_out()
        d = self.config.data
        source = _open_text(d, d.eval_files)
        return text.load_held_out(source, tokenizer=self.tokenizer, seq_length=self.seq_length,
                                  max_rows=self.config.eval.max_examples or 256,
                                  docs_per_row=d.docs_per_row)


def _open_text(d: ConfigDict, files: str):
    from input_pipeline import text  # pylint: disable=import-outside-toplevel

    return text.open_text_source(d.name, files, text_key=d.text_key,
                                 data_dir=d.data_dir or None, record_format=d.record_format)


def _lm_config(config: ConfigDict) -> ConfigDict:
    """The language model's config: ``model`` itself, or Flamingo's ``model.lm``."""
    return config.model.lm if config.model.name == "flamingo" else config.model


def document_batch(config: ConfigDict) -> dict[str, tuple[tuple, Any]]:
    """``{key: (global shape, dtype)}`` of a language-model / Flamingo training batch."""
    b, d = config.batch_size, config.data
    lm = _lm_config(config)
    length = d.get("seq_length", 0) or lm.max_length
    out = {"tokens": ((b, length), np.int32), "weights": ((b, length), np.float32)}
    if config.model.name == "flamingo":
        size = config.model.vision.image_size
        out["images"] = ((b, d.get("max_images", 5), size, size, 3), np.uint8)
    return out


def _prepare_documents(config: ConfigDict, for_eval: bool = False) -> DocumentData:
    from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

    d = config.data
    lm = _lm_config(config)
    if d.get("seq_length", 0) > lm.max_length:
        raise ConfigError(f"config.data.seq_length={d.seq_length} exceeds the language model's "
                          f"max_length={lm.max_length}.")
    if d.name != "shapes":  # The shapes dataset is built only when it is the data.
        return _prepare_document_source(config, lm, for_eval)
    data_dir = d.data_dir or shapes_builder.default_data_dir()
    shapes_builder.prepare(data_dir, config=d.config_name, num_train=d.num_train or None,
                           process_index=jax.process_index())
    tokenizer = interleaved.lm_tokenizer(lm.max_length)
    if tokenizer.vocab_size > lm.vocab_size:
        raise ConfigError(f"The language model's vocab_size={lm.vocab_size} is smaller than the "
                          f"shapes LM tokenizer's vocabulary ({tokenizer.vocab_size}).")
    return DocumentData(config, str(data_dir), tokenizer)


TEXT_DOCUMENT_SOURCES = ("tfds", "jsonl", "array_record")  # data.name: the LM's text corpora
WEB_DOCUMENT_SOURCES = ("webdataset",)  # data.name: Flamingo's interleaved web documents


def _prepare_document_source(config: ConfigDict, lm: ConfigDict, for_eval: bool
                             ) -> DocumentData:
    """A text corpus (language model) or interleaved web documents (Flamingo): the run's
    tokenizer (``config.data.tokenizer``, default the shapes LM tokenizer) and, unless
    ``for_eval``, the opened training source (``config.data.train_files``)."""
    from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel
    from input_pipeline.tokenizers import SentencePieceTokenizer  # pylint: disable=C0415

    d = config.data
    data = DocumentData(config, d.data_dir, None)
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


def _captions_per_image(retrieval: dict) -> list[list[str]]:
    """The captions of each image of a retrieval split (``caption`` + ``text_to_image``)."""
    per_image: list[list[str]] = [[] for _ in range(len(retrieval["image"]))]
    for caption, i in zip(retrieval["caption"], retrieval["text_to_image"]):
        per_image[int(i)].append(caption)
    return per_image


def global_skip_stats() -> dict[str, int]:
    """The bad-sample counts of :data:`input_pipeline.transforms.SKIP_STATS` (``seen``,
    ``skipped``, ``skipped/<reason>``) summed over all processes.

    Every process gets the same numbers, so :func:`check_skipped` takes the same decision on all
    of them (a process whose shards hold the bad samples does not stop alone, leaving the others
    waiting in the next collective), and the logged ``data/*`` are those of the whole run.
    A collective: call it at the same steps on every process (the log steps).
    """
    from input_pipeline.transforms import DROP_REASONS, SKIP_REASONS, SKIP_STATS  # pylint: disable=C0415
    from vlm_jax import runtime  # pylint: disable=import-outside-toplevel

    keys = ("seen", "skipped", *(f"skipped/{r}" for r in SKIP_REASONS),
            *(f"dropped_images/{r}" for r in DROP_REASONS))
    local = SKIP_STATS.snapshot()
    unknown = [k for k in local if k not in keys]
    if unknown:  # A reason added to the pipeline but not to SKIP_REASONS would be lost.
        raise ValueError(f"SKIP_STATS has reasons {unknown} that SKIP_REASONS does not list.")
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
    limit = config.data.get("max_skipped_fraction", 1.0)
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
            f"({config.data.get('train_files', '')}) or raise the threshold.")


def _open(kind: str, files: str, d: ConfigDict, data_dir: str):
    if kind == "tfds":  # files = '<name>@<split>' of a dataset prepared in data_dir
        return sources.open_source(kind, files, data_dir=data_dir,
                                   image_key=d.get("image_key", "image"),
                                   caption_key=d.get("caption_key", "caption"))
    return sources.open_source(kind, files)


def prepare(config: ConfigDict, for_eval: bool = False) -> Data:
    """Builds the dataset if needed (process 0; others wait) and loads its tokenizer.

    ``config.data.name`` is ``'shapes'`` (the embedded dataset) or a raw image-text source,
    ``'webdataset'`` / ``'array_record'`` with ``config.data.train_files`` (paths, brace ranges,
    globs); those are evaluated on the shapes splits named by ``data.eval_name`` /
    ``data.config_name`` and tokenised with ``data.tokenizer`` (CLIP's BPE merges file
    ``bpe_simple_vocab_16e6.txt.gz`` or a sentencepiece ``.model``; default: the shapes
    tokenizer). ``for_eval``: the training data is not opened (``vlm-jax eval``).
    """
    d = config.data
    if config.model.name in ("lm", "flamingo"):
        return _prepare_documents(config, for_eval)
    if d.name != "shapes" and d.name not in SOURCES:
        raise ConfigError(f"config.data.name={d.name!r}: use 'shapes' (embedded) or a source of "
                          f"image-text shards {list(SOURCES)} with config.data.train_files.")
    data_dir = d.data_dir or shapes_builder.default_data_dir()
    source = None
    if d.name in SOURCES and not for_eval:
        if d.get("mixture"):  # [{'name': ..., 'train_files': ..., 'weight': ...}, ...]
            parts = []
            for i, part in enumerate(d.mixture):
                missing = {"name", "train_files", "weight"} - set(part)
                if missing or part["name"] not in SOURCES:
                    raise ConfigError(f"config.data.mixture[{i}] = {dict(part)}: needs name "
                                      f"(one of {list(SOURCES)}), train_files and weight.")
                parts.append((_open(part["name"], part["train_files"], d, data_dir),
                              float(part["weight"])))
            source = parts
        elif not d.get("train_files"):
            raise ConfigError(f"config.data.name={d.name!r} needs config.data.train_files "
                              "(e.g. 'shards/train-{00000..00009}.tar') or config.data.mixture.")
        else:
            source = _open(d.name, d.train_files, d, data_dir)
        for src in (source if isinstance(source, list) else [source]):
            src = src[0] if isinstance(src, tuple) else src
            for path, reason in getattr(src, "skipped_shards", []):
                print(f"Warning: skipped unreadable shard {path}: {reason}")
    eval_name = d.get("eval_name", "shapes") if d.name in SOURCES else d.name
    shapes_builder.prepare(data_dir, config=d.config_name, num_train=d.num_train or None,
                           process_index=jax.process_index())
    if d.name in SOURCES and d.get("tokenizer"):
        from input_pipeline.tokenizers import load_tokenizer  # pylint: disable=import-outside-toplevel

        tokenizer = load_tokenizer(d.tokenizer, config.model.text.context_length)
    else:
        tokenizer = pipeline.tokenizer_for(data_dir=data_dir, dataset=eval_name,
                                           config_name=d.config_name,
                                           context_length=config.model.text.context_length)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"config.model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}); set it to at least that.")
    return Data(config, str(data_dir), tokenizer, source)
