"""Connects ``config.data`` to the grain pipelines of ``input_pipeline``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from ml_collections import ConfigDict

from input_pipeline import DataError, pipeline, sources
from input_pipeline.shapes import builder as shapes_builder
from vlm_jax.config import ConfigError


SOURCES = ("webdataset", "array_record", "tfds")  # config.data.name for raw image-text data


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
            worker_count=d.worker_count, image_size=self.config.model.image.image_size)



@dataclasses.dataclass
class DocumentData:
    """Interleaved shapes documents (:mod:`input_pipeline.interleaved`) for the language model
    (text only) and Flamingo (with images); same interface as :class:`Data`.

    ``lm``: the language model's config (its vocabulary and ``max_length``); ``image_size``: the
    side of the images of multimodal documents, None for text only."""

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

        return interleaved.create_document_iterator(
            split="train", global_batch_size=self.config.batch_size, seed=self.config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=self.config.data.worker_count,
            docs_per_row=self.config.data.get("docs_per_row", 1), **self._document_kwargs())

def document_length(config: ConfigDict, lm: Any) -> int:
    """Training sequence length of documents: ``config.data.seq_length`` (0 = the language
    model's ``max_length``)."""
    return config.data.get("seq_length", 0) or lm.max_length


def document_max_images(config: ConfigDict) -> int:
    """Image slots per multimodal document row: ``config.data.max_images`` (default 5)."""
    return config.data.get("max_images", 5)


def prepare_documents(config: ConfigDict, *, lm: Any, image_size: int | None = None
                      ) -> DocumentData:
    """Builds the shapes dataset if needed and loads the LM tokenizer: documents for the
    language model ``lm`` (its config), with images of side ``image_size`` (None: text only)."""
    from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

    d = config.data
    if d.name != "shapes":
        raise ConfigError(f"config.data.name={d.name!r}: this model trains on the interleaved "
                          "shapes documents, config.data.name='shapes'.")
    data_dir = d.data_dir or shapes_builder.default_data_dir()
    shapes_builder.prepare(data_dir, config=d.config_name, num_train=d.num_train or None,
                           process_index=jax.process_index())
    if d.get("seq_length", 0) > lm.max_length:
        raise ConfigError(f"config.data.seq_length={d.seq_length} exceeds the language model's "
                          f"max_length={lm.max_length}.")
    tokenizer = interleaved.lm_tokenizer(lm.max_length)
    if tokenizer.vocab_size > lm.vocab_size:
        raise ConfigError(f"The language model's vocab_size={lm.vocab_size} is smaller than the "
                          f"shapes LM tokenizer's vocabulary ({tokenizer.vocab_size}).")
    return DocumentData(config, str(data_dir), tokenizer, lm, image_size)


def global_skip_stats() -> dict[str, int]:
    """The bad-sample counts of :data:`input_pipeline.transforms.SKIP_STATS` (``seen``,
    ``skipped``, ``skipped/<reason>``) summed over all processes.

    Every process gets the same numbers, so :func:`check_skipped` takes the same decision on all
    of them (a process whose shards hold the bad samples does not stop alone, leaving the others
    waiting in the next collective), and the logged ``data/*`` are those of the whole run.
    A collective: call it at the same steps on every process (the log steps).
    """
    from input_pipeline.transforms import SKIP_REASONS, SKIP_STATS  # pylint: disable=C0415
    from vlm_jax import runtime  # pylint: disable=import-outside-toplevel

    keys = ("seen", "skipped", *(f"skipped/{r}" for r in SKIP_REASONS))
    local = SKIP_STATS.snapshot()
    unknown = [k for k in local if k not in keys]
    if unknown:  # A reason added to the pipeline but not to SKIP_REASONS would be lost.
        raise ValueError(f"SKIP_STATS has reasons {unknown} that SKIP_REASONS does not list.")
    total = runtime.global_counts(local, keys)
    return {k: v for k, v in total.items() if v or not k.startswith("skipped/")}


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
    """The image-text data of a dual-encoder run (CLIP, SigLIP, CoCa; other families prepare
    theirs, e.g. :func:`prepare_documents`: ask ``families.get_family(config).make_data``).
    Builds the dataset if needed (process 0; others wait) and loads its tokenizer.

    ``config.data.name`` is ``'shapes'`` (the embedded dataset) or a raw image-text source,
    ``'webdataset'`` / ``'array_record'`` with ``config.data.train_files`` (paths, brace ranges,
    globs); those are evaluated on the shapes splits named by ``data.eval_name`` /
    ``data.config_name`` and tokenised with ``data.tokenizer`` (CLIP's BPE merges file
    ``bpe_simple_vocab_16e6.txt.gz`` or a sentencepiece ``.model``; default: the shapes
    tokenizer). ``for_eval``: the training data is not opened (``vlm-jax eval``).
    """
    d = config.data
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
