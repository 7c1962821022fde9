"""Evaluation as named entries, each with its own dataset (``config.evals``).

A config lists its evaluations by name::

    c.eval = dict(batch_size=256, data_dir="")   # shared: feature-extraction batch, TFDS dir
    c.evals = dict(
        zeroshot=dict(type="zeroshot", dataset="shapes", split="test", every_steps=400,
                      max_examples=0, options=dict()),
        heldout=dict(type="zeroshot", dataset="shapes", split="test_heldout", every_steps=0,
                     max_examples=0, options=dict()),
        cifar10=dict(type="zeroshot", dataset="tfds:cifar10", split="test", every_steps=0,
                     max_examples=0, options=dict()),
    )

``type`` is an evaluator of :data:`vlm_jax.evaluators.EVALUATORS`; ``dataset`` is ``"shapes"``
(the embedded dataset at the run's ``data.config_name``), ``"tfds:<name>"`` (a prepared TFDS
dataset in ``eval.data_dir``) or, for ``lm_loss``, ``"eval_files"`` (the held-out text of a text
corpus, ``data.eval_files``); ``every_steps`` N > 0 evaluates every N steps and at the end of
training, 0 only at the end, -1 never during training (on request: ``vlm-jax eval --evaluators
<name>``); ``max_examples`` 0 = the whole split; ``options`` the type's settings
(:data:`DATA_OPTIONS` shape the data it loads, the others go to the evaluator). Results are keyed
``<entry name>/<metric>``.

:class:`Evaluation` is what a run builds once: it parses the entries, checks from each dataset's
metadata (no example read) that every entry's evaluator can run on its data and on the model's
capabilities, loads each dataset once (entries on the same split share it), and builds the
feature extractor and its jitted functions once, so that evaluations after the first compile
nothing. Loading a ``tfds:`` dataset never builds the shapes dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import jax
from etils import epath
from ml_collections import ConfigDict

from input_pipeline import pipeline
from input_pipeline.shapes import builder as shapes_builder
from vlm_jax import evaluators as evaluators_lib
from vlm_jax.config import ConfigError
from vlm_jax.evaluators.common import FeatureExtractor

ENTRY_FIELDS = ("type", "dataset", "split", "every_steps", "max_examples", "options")
# Fields an entry may leave out (e.g. one added from the command line), with their defaults.
ENTRY_DEFAULTS = dict(dataset="shapes", split="test", every_steps=0, max_examples=0, options={})
RETRIEVAL_DATASETS = ("coco_captions", "flickr30k", "coco")  # tfds:<name> read as captions

# Options that decide what data an entry loads, with their defaults; the other options of an
# entry are keyword arguments of its evaluator (linear_probe: shots, l2_regs...; fewshot_*:
# shots, max_new_tokens; captioning: the decoding options of vlm_jax.decoding.generate).
DATA_OPTIONS = {
    "linear_probe": dict(probe_examples=5000, probe_split="train",
                         probe_val_split="validation"),
    "fewshot_vqa": dict(fewshot_pool=1000, fewshot_pool_split="train"),
    "fewshot_captioning": dict(fewshot_pool=1000, fewshot_pool_split="train"),
}
# The evaluator's own options of each type (None: any; captioning takes the decoding options of
# vlm_jax.decoding.generate, which checks them when it compiles).
EVALUATOR_OPTIONS = {
    "zeroshot": (), "retrieval": (), "lm_loss": (), "captioning": None,
    "linear_probe": ("shots", "l2_regs", "weight_decays", "max_iter", "tol", "val_fraction",
                     "seed"),
    "fewshot_vqa": ("shots", "max_new_tokens"),
    "fewshot_captioning": ("shots", "max_new_tokens"),
    "refexp": ("iou_threshold",),
}
# How an evaluator type's data is loaded: image-text pairs (classification / captions), images
# with an in-context pool (Flamingo), or text documents (language model).
LOADER = {"zeroshot": "pairs", "retrieval": "pairs", "linear_probe": "pairs",
          "captioning": "pairs", "fewshot_vqa": "fewshot", "fewshot_captioning": "fewshot",
          "lm_loss": "documents", "refexp": "pairs"}
TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
         "linear_probe": "linear_probe", "captioning": "captioning",  # CLIP_benchmark's names
         "fewshot_vqa": "fewshot_vqa", "fewshot_captioning": "fewshot_captioning",
         "lm_loss": "language_modeling", "refexp": "referring_expression_localisation"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One named evaluation of ``config.evals``."""

    name: str
    type: str
    dataset: str  # "shapes", "tfds:<name>" or "eval_files"
    split: str
    every_steps: int  # N > 0: every N steps and at the end; 0: at the end; -1: on request only
    max_examples: int  # 0: the whole split
    options: Mapping[str, Any]

    @property
    def key(self) -> str:
        """The config key that defines this entry, for messages."""
        return f"config.evals.{self.name}"

    @property
    def where(self) -> str:
        """``<dataset>/<split>`` (``shapes/test``, ``tfds:cifar10/test``); ``eval_files`` (the
        held-out files have no split)."""
        return self.dataset if self.dataset == "eval_files" else f"{self.dataset}/{self.split}"

    @property
    def tfds_name(self) -> str | None:
        return self.dataset[len("tfds:"):] if self.dataset.startswith("tfds:") else None

    def data_options(self) -> dict[str, Any]:
        """The options that shape the data (with defaults)."""
        defaults = DATA_OPTIONS.get(self.type, {})
        return {k: self.options.get(k, v) for k, v in defaults.items()}

    def evaluator_options(self) -> dict[str, Any]:
        """The options passed to the evaluator."""
        return {k: v for k, v in self.options.items() if k not in DATA_OPTIONS.get(self.type, {})}

    def due(self, step: int, total: int) -> bool:
        """Whether a training run evaluates this entry after ``step`` of ``total``."""
        if self.every_steps < 0:
            return False
        return step == total or (self.every_steps > 0 and step % self.every_steps == 0)


def parse_entries(config: ConfigDict, names: Sequence[str] | None = None,
                  defaults: Mapping[str, Any] | None = None) -> list[Entry]:
    """The entries of ``config.evals`` (``defaults``, the family's, when the config has none):
    all but the on-request ones (``every_steps=-1``) or, with ``names``, those named (in that
    order).

    Raises:
        ConfigError: naming ``config.evals.<name>`` for an unknown field, type or dataset, a bad
            value, or an unknown name in ``names``.
    """
    evals = config.evals if "evals" in config else (defaults or {})
    out = []
    for name, raw in evals.items():
        raw = dict(raw)
        key = f"config.evals.{name}"
        unknown = sorted(set(raw) - set(ENTRY_FIELDS))
        if unknown:
            raise ConfigError(f"{key}: unknown field(s) {unknown}; an entry has "
                              f"{list(ENTRY_FIELDS)} (type-specific settings go in options).")
        fields = {**ENTRY_DEFAULTS, "type": name, **raw}
        kind = fields["type"]
        if kind not in evaluators_lib.EVALUATORS:
            raise ConfigError(f"{key}.type={kind!r}: unknown evaluator; available: "
                              f"{sorted(evaluators_lib.EVALUATORS)}.")
        dataset = str(fields["dataset"])
        if dataset == "eval_files" and LOADER[kind] != "documents":
            raise ConfigError(f"{key}.dataset='eval_files' (config.data.eval_files, held-out "
                              f"text) is read by 'lm_loss' entries, not by {kind!r}.")
        if dataset not in ("shapes", "eval_files") and not (
                dataset.startswith("tfds:") and len(dataset) > 5):
            raise ConfigError(f"{key}.dataset={dataset!r}: use 'shapes' (the embedded dataset), "
                              "'tfds:<name>' (a prepared TFDS dataset in config.eval.data_dir, "
                              "e.g. tfds:imagenet2012, tfds:cifar10, tfds:coco_captions) or, for "
                              "lm_loss, 'eval_files' (the held-out text config.data.eval_files).")
        try:
            every, max_examples = int(fields["every_steps"]), int(fields["max_examples"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: every_steps and max_examples are integers ({e}).") from e
        if every < -1 or max_examples < 0:
            raise ConfigError(f"{key}: every_steps={every} (N > 0 every N steps, 0 at the end, "
                              f"-1 on request) and max_examples={max_examples} (>= 0, 0 = all).")
        options = dict(fields["options"] or {})
        known = EVALUATOR_OPTIONS[kind]
        if known is not None:
            known = (*DATA_OPTIONS.get(kind, {}), *known)
            bad = sorted(k for k in options if k not in known)
            if bad:
                raise ConfigError(f"{key}.options: unknown option(s) {bad} for type {kind!r}; "
                                  f"it takes {list(known) or 'none'}.")
        out.append(Entry(name, kind, dataset, str(fields["split"]), every, max_examples,
                         options))
    if names is None:
        return [e for e in out if e.every_steps >= 0]
    by_name = {e.name: e for e in out}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"--evaluators: no entry {unknown} in config.evals; the entries are "
                          f"{sorted(by_name)} (add one with --config.evals=... or in the config "
                          "file).")
    return [by_name[n] for n in names]


def capability_misfit(kind: str, capabilities: Collection[str] | None) -> str | None:
    """Why a model with ``capabilities`` cannot run evaluator ``kind`` (None: it can)."""
    need = evaluators_lib.CAPABILITY[kind]
    if capabilities is None or need in capabilities:
        return None
    return (f"the model's capabilities are {sorted(capabilities)}, without {need!r} "
            f"({evaluators_lib.CAPABILITIES[need]})")


class Evaluation:
    """The evaluations of one run (or one ``vlm-jax eval``), built once.

    Args:
      config: the run's config (``config.evals``, ``config.eval``, ``config.data``).
      data: the run's prepared data (``vlm_jax.data.prepare``): its ``tokenizer``, ``data_dir``
        (shapes) and, for Flamingo / the language model, ``prompt_format`` and the document
        settings.
      capabilities: what the model can do (``Family.capabilities``: embed, caption,
        interleaved, lm); None skips the model check.
      image_size: the image side the model reads (None: a text-only model).
      names: the entries to run (default: all of ``config.evals`` but the on-request ones).
      defaults: the entries of a config without ``evals`` (``Family.default_evals``).
    """

    def __init__(self, config: ConfigDict, data: Any, *, capabilities: Collection[str] | None,
                 image_size: int | None, names: Sequence[str] | None = None,
                 defaults: Mapping[str, Any] | None = None):
        self.config, self.data = config, data
        self.capabilities = None if capabilities is None else frozenset(capabilities)
        self.image_size = image_size
        self.entries = parse_entries(config, names, defaults)
        self._loaded: dict[tuple, dict] = {}
        self._extractor: FeatureExtractor | None = None
        self._setup = None
        self._shapes_dir_ready: str | None = None

    # -- the start-of-run check ----------------------------------------------------------------

    def check(self) -> None:
        """Checks, from each dataset's metadata alone (TFDS ``dataset_info.json`` /
        ``features.json``; no example read or decoded), that every entry's evaluator can run on
        its data and on the model: a misfit is reported before step 0, not at the first
        evaluation.

        Raises:
            ConfigError: naming ``config.evals.<name>``, what its evaluator needs, what the data
                or the model lacks, and the evaluator types that run there.
            DataError: a dataset or a split an entry reads is not prepared.
        """
        lines = []
        for entry in self.entries:
            keys = self.keys(entry)
            reasons = []
            missing = [k for k in evaluators_lib.NEEDS[entry.type] if k not in keys]
            if missing:
                reasons.append(f"the data has no {missing}")
            model = capability_misfit(entry.type, self.capabilities)
            if model:
                reasons.append(model)
            if reasons:
                runs = self._types_that_run(entry)
                lines.append(f"  {entry.key} (type {entry.type!r}) on {entry.where}: "
                             f"{entry.type!r} needs {evaluators_lib.WHAT[entry.type]}; "
                             f"{' and '.join(reasons)}. On {entry.where} with this model these "
                             f"evaluators run: {runs or 'none'}.")
        if lines:
            raise ConfigError(
                "Evaluation entries that cannot run on their data:\n" + "\n".join(lines)
                + "\nSet the entry's type or dataset (--config.evals.<name>.dataset=..., "
                "--config.evals.<name>.type=...), or leave it out (vlm-jax eval --evaluators).")

    def _types_that_run(self, entry: Entry) -> list[str]:
        """The evaluator types that could run on ``entry``'s dataset and split, with default
        options, on this model (for the error message)."""
        from input_pipeline import DataError  # pylint: disable=import-outside-toplevel

        runs = []
        for kind in evaluators_lib.EVALUATORS:
            if capability_misfit(kind, self.capabilities):
                continue
            try:
                keys = self.keys(dataclasses.replace(entry, type=kind, options={}))
            except (DataError, ConfigError):
                continue
            if all(k in keys for k in evaluators_lib.NEEDS[kind]):
                runs.append(kind)
        return runs

    def keys(self, entry: Entry) -> set[str]:
        """The keys :meth:`load` returns for ``entry``, from the dataset's metadata alone.

        Raises:
            DataError: the dataset, the split or a split it also reads (the linear probe's,
                the in-context pool's) is missing.
        """
        from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

        loader, name, opts = LOADER[entry.type], entry.tfds_name, entry.data_options()
        data_dir = self.config.eval.data_dir or None
        if loader == "pairs":
            probe = [opts[k] for k in ("probe_split", "probe_val_split") if k in opts]
            if name is None:
                builder = pipeline.split_builder(self._shapes_dir(), "shapes",
                                                 self.config.data.config_name, [entry.split])
                keys = pipeline.eval_split_keys(builder)
            else:
                builder = eval_data.open_builder(name, [entry.split], data_dir)
                if _is_captions(name):
                    keys = eval_data.retrieval_keys(builder)
                    if "caption" in keys:
                        keys |= {"text", "captions"}
                else:
                    keys = eval_data.classification_keys(builder)
            if (probe and "label" in keys
                    and all(s.split("[", 1)[0] in builder.info.splits for s in probe)):
                keys |= {"probe_train", "probe_val"}
            return keys
        if loader == "fewshot":
            splits = [entry.split, opts["fewshot_pool_split"]]
            if name is not None:
                if not _is_captions(name):
                    raise ConfigError(f"{entry.key}.dataset={entry.dataset}: few-shot "
                                      f"evaluation on TFDS reads a captions dataset "
                                      f"({', '.join(RETRIEVAL_DATASETS)}).")
                builder = eval_data.open_builder(name, splits, data_dir)
                if "caption" not in eval_data.retrieval_keys(builder):
                    return {"image"}
                return {"image", "captions", "pool", "prompt_format"}
            builder = pipeline.split_builder(self._shapes_dir(), "shapes",
                                             self.config.data.config_name, splits)
            keys = pipeline.eval_split_keys(builder)
            if {"question", "answer", "caption"} <= keys:
                keys |= {"pool", "prompt_format"}
            return keys
        # documents: held-out interleaved shapes documents, or the run's held-out text.
        if entry.dataset == "eval_files":
            self.data.check_held_out(entry.key)
            return {"documents", "weights"}
        if name is not None:
            raise ConfigError(f"{entry.key}.dataset={entry.dataset}: {entry.type!r} reads the "
                              "interleaved shapes documents (dataset='shapes') or the held-out "
                              "text of a text corpus (dataset='eval_files').")
        pipeline.split_builder(self._shapes_dir(), "shapes", self.config.data.config_name,
                               [entry.split])
        return {"documents", "weights"}

    # -- data ----------------------------------------------------------------------------------

    def _shapes_dir(self) -> str:
        """The shapes dataset's directory, built if missing (only entries on shapes ask)."""
        if self._shapes_dir_ready is None:
            d = self.config.data
            data_dir = getattr(self.data, "data_dir", None) or d.data_dir \
                or shapes_builder.default_data_dir()
            shapes_builder.prepare(data_dir, config=d.config_name,
                                   num_train=d.num_train or None,
                                   process_index=jax.process_index())
            self._shapes_dir_ready = str(data_dir)
        return self._shapes_dir_ready

    def load(self, entry: Entry) -> dict:
        """``entry``'s evaluation data in memory; entries that read the same data share it."""
        key = (LOADER[entry.type], entry.dataset, entry.split, entry.max_examples,
               tuple(sorted(entry.data_options().items())))
        if key not in self._loaded:
            loader = {"pairs": self._pairs, "fewshot": self._fewshot,
                      "documents": self._documents}[LOADER[entry.type]]
            self._loaded[key] = loader(entry)
        return self._loaded[key]

    def _pairs(self, entry: Entry) -> dict:
        """Images with labels / captions (zeroshot, retrieval, linear_probe, captioning), at the
        model's image size and tokenised with the run's tokenizer; for the linear probe also
        ``probe_train`` / ``probe_val`` (``probe_examples`` images of ``probe_split`` /
        ``probe_val_split``)."""
        out = self._pairs_split(entry, entry.split, entry.max_examples or None)
        opts = entry.data_options()
        if entry.type == "linear_probe" and "label" in out:
            n = opts["probe_examples"] or None
            train, val = (self._pairs_split(entry, opts[k], n)
                          for k in ("probe_split", "probe_val_split"))
            out["probe_train"] = {"image": train["image"], "label": train["label"]}
            out["probe_val"] = {"image": val["image"], "label": val["label"]}
        return out

    def _pairs_split(self, entry: Entry, split: str, max_examples: int | None) -> dict:
        from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

        tokenizer, name = self.data.tokenizer, entry.tfds_name
        if name is not None:
            kw = dict(split=split, data_dir=self.config.eval.data_dir or None,
                      image_size=self.image_size, max_examples=max_examples,
                      resize_mode=self.config.eval.get("resize_mode", "shortest"))
            if _is_captions(name):
                out = eval_data.load_tfds_retrieval(name, **kw)
                out["text"] = tokenizer.encode(out["caption"])
                out["captions"] = captions_per_image(out)  # the captioning references
                return out
            return eval_data.load_tfds_classification(name, **kw)
        d = self.config.data
        native = int(str(d.config_name).removesuffix("px"))
        raw_source = d.name != "shapes"  # evaluated on shapes; images always resized
        size = self.image_size
        out = pipeline.load_eval_split(
            data_dir=self._shapes_dir(), dataset="shapes", config_name=d.config_name,
            split=split, context_length=tokenizer.context_length, max_examples=max_examples,
            image_size=size if size != native or raw_source else None)
        if d.tokenizer:  # The run's tokenizer, not the one shipped with the dataset.
            out["text"] = tokenizer.encode(out["caption"])
        return out

    def _fewshot(self, entry: Entry) -> dict:
        """Query images (with questions / answers / captions) and the in-context pool
        (``fewshot_pool`` records of ``fewshot_pool_split``) for Flamingo's few-shot
        evaluators, with the prompt format."""
        from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

        opts, name = entry.data_options(), entry.tfds_name
        if name is not None:
            kw = dict(data_dir=self.config.eval.data_dir or None,
                      image_size=self.image_size)

            def load(split, n):
                raw = eval_data.load_tfds_retrieval(name, split=split, max_examples=n, **kw)
                return raw["image"], captions_per_image(raw)

            images, captions = load(entry.split, entry.max_examples or None)
            pool_images, pool_captions = load(opts["fewshot_pool_split"], opts["fewshot_pool"])
            return {"image": images, "captions": captions,
                    "pool": {"image": pool_images, "caption": [c[0] for c in pool_captions]},
                    "prompt_format": self.data.prompt_format}
        d = self.config.data
        native = int(str(d.config_name).removesuffix("px"))
        kw = dict(data_dir=self._shapes_dir(), dataset="shapes", config_name=d.config_name,
                  context_length=8,
                  image_size=self.image_size if self.image_size != native else None)
        out = pipeline.load_eval_split(split=entry.split,
                                       max_examples=entry.max_examples or None, **kw)
        pool = pipeline.load_eval_split(split=opts["fewshot_pool_split"],
                                        max_examples=opts["fewshot_pool"], **kw)
        out["pool"] = {k: pool[k] for k in ("image", "question", "answer", "caption")}
        out["prompt_format"] = self.data.prompt_format
        return out

    def _documents(self, entry: Entry) -> dict:
        """Held-out rows (``max_examples``, default 256): of the interleaved shapes documents of
        ``split``, or of the run's held-out text (``dataset='eval_files'``:
        ``config.data.eval_files``, in file order)."""
        from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

        if entry.dataset == "eval_files":
            return self.data.held_out_text(entry.key, entry.max_examples or 256)
        kw = self.data._document_kwargs()  # pylint: disable=protected-access
        kw["data_dir"] = self._shapes_dir()  # shapes, whatever the run trains on
        it = interleaved.create_document_iterator(
            split=entry.split, global_batch_size=min(256, entry.max_examples or 256), seed=0,
            docs_per_row=self.config.data.docs_per_row, **kw)
        batch = next(it)
        return {"documents": batch["tokens"], "weights": batch["weights"]}

    # -- running -------------------------------------------------------------------------------

    def extractor(self, s, params) -> FeatureExtractor:
        """The run's feature extractor (jitted functions built on the first call, reused after),
        holding ``params``. ``s``: the run's setup (graphdef, param_shardings, mesh, rules)."""
        if self._extractor is None or self._setup is not s:
            self._extractor = FeatureExtractor(s.graphdef, params, s.param_shardings, s.mesh,
                                               s.rules, self.config.eval.batch_size,
                                               tokenizer=self.data.tokenizer)
            self._setup = s
        self._extractor.params = params
        return self._extractor

    def due(self, step: int, total: int) -> list[Entry]:
        """The entries a training run evaluates after ``step`` (all of them at ``total``)."""
        return [e for e in self.entries if e.due(step, total)]

    def run(self, s, params, entries: Iterable[Entry] | None = None) -> dict[str, float]:
        """Runs ``entries`` (default: all) with ``params``; ``{'<entry>/<metric>': value}``."""
        entries = self.entries if entries is None else list(entries)
        extractor = self.extractor(s, params)
        try:
            return run_entries(extractor, self.data.tokenizer, entries,
                               {e.name: self.load(e) for e in entries})
        finally:
            extractor.params = None  # The train step donates these buffers: hold no reference.


class _CaptionOptions:
    """The extractor seen by the captioning evaluator: ``captions(images)`` decodes with the
    entry's options (``method``, ``beam_size``...); everything else is the extractor's."""

    def __init__(self, extractor: FeatureExtractor, options: Mapping[str, Any]):
        self._extractor, self._options = extractor, dict(options)

    def captions(self, images):
        return self._extractor.captions(images, **self._options)

    def __getattr__(self, name):
        return getattr(self._extractor, name)


def run_entries(extractor: FeatureExtractor, tokenizer, entries: Iterable[Entry],
                data: Mapping[str, dict]) -> dict[str, float]:
    """Runs each entry's evaluator on ``data[entry.name]``; ``{'<entry>/<metric>': value}``.

    Raises:
        ConfigError: an entry's options do not fit its evaluator or its data (naming the entry).
    """
    results = {}
    for entry in entries:
        opts = entry.evaluator_options()
        fn = evaluators_lib.EVALUATORS[entry.type]
        try:
            if entry.type == "captioning":
                out = fn(_CaptionOptions(extractor, opts), tokenizer, data[entry.name])
            else:
                out = fn(extractor, tokenizer, data[entry.name], **opts)
        except (ValueError, TypeError) as e:  # Options or data that do not fit the evaluator.
            raise ConfigError(f"{entry.key} (type {entry.type!r}) on {entry.where}: {e} "
                              f"(its options: {opts or 'none'})") from e
        for k, v in out.items():
            results[f"{entry.name}/{k}"] = v
    return results


def write_results(workdir: epath.Path, config: ConfigDict, entries: Iterable[Entry], step: int,
                  results: Mapping[str, float]) -> list[epath.Path]:
    """Writes ``eval_results_<split>.json`` per dataset and split (``eval_results_test.json``
    for shapes, ``eval_results_tfds_cifar10_test.json``, ``eval_results_eval_files.json``...), one record per entry with
    CLIP_benchmark's field names (``dataset``, ``model``, ``task``, ``metrics``) plus ``entry``,
    ``split`` and ``step``; prints a markdown table. Records of other entries already in a file
    are kept (evaluated earlier); an entry evaluated again is replaced. Also writes the same
    results as CLIP_benchmark writes them (:func:`write_clip_benchmark`). Returns the
    ``eval_results_*.json`` files."""
    entries = list(entries)
    write_clip_benchmark(workdir / CLIP_BENCHMARK_DIR, config, entries, step, results,
                         checkpoint=workdir / "checkpoints" / str(int(step)))
    files: dict[str, list[dict]] = {}
    wheres: dict[str, str] = {}
    for entry in entries:
        m = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(entry.name + "/")}
        if not m:
            continue
        stem = entry.split if entry.dataset == "shapes" else (
            entry.where.replace(":", "_").replace("/", "_"))
        wheres[stem] = entry.where
        files.setdefault(stem, []).append(
            {"entry": entry.name, "dataset": entry.dataset, "split": entry.split,
             "model": config.name, "step": int(step),
             "task": TASKS[entry.type], "metrics": m})
    written = []
    for stem, records in files.items():
        out = workdir / f"eval_results_{stem}.json"
        written.append(out)
        if jax.process_index() != 0:
            continue
        new = {r["entry"] for r in records}
        try:
            kept = [r for r in json.loads(out.read_text()) if r.get("entry") not in new]
        except (FileNotFoundError, ValueError, AttributeError):
            kept = []
        out.write_text(json.dumps(kept + records, indent=2))
        print(f"\n| metric ({wheres[stem]}, step {step}) | value |")
        print("|---|---|")
        for r in records:  # Accuracies and scores in %, losses as they are.
            for k, v in r["metrics"].items():
                raw = k in ("loss", "perplexity")
                name = f"{r['entry']}/{k}"
                print(f"| {name} | {v:.3f} |" if raw else f"| {name} | {100 * v:.2f} |")
    return written


CLIP_BENCHMARK_DIR = "clip_benchmark"  # <workdir>/clip_benchmark/: CLIP_benchmark's files only
# CLIP_benchmark's default --output template (clip_benchmark/cli.py).
CLIP_BENCHMARK_OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
LANGUAGE = "en"  # The language of the class names, templates and captions evaluated here.
# Metrics that CLIP_benchmark names otherwise, per task: its linear probe's (metrics/
# linear_probe.py) and pycocoevalcap's captioning scores (metrics/captioning.py).
CLIP_BENCHMARK_METRICS = {
    "linear_probe": {"acc1": "lp_acc1", "acc5": "lp_acc5",
                     "mean_per_class_recall": "lp_mean_per_class_recall"},
    "captioning": {"bleu1": "Bleu_1", "bleu4": "Bleu_4", "rouge_l": "ROUGE_L", "cider": "CIDEr"},
}


def clip_benchmark_records(config: ConfigDict, entries: Iterable[Entry],
                           results: Mapping[str, float], checkpoint: str, step: int
                           ) -> dict[str, dict[str, Any]]:
    """``{file name: record}`` of the entries evaluated in ``results``, as ``clip_benchmark
    eval`` writes them (``clip_benchmark/cli.py``, ``run``): one JSON object per dataset and
    task with ``dataset`` (CLIP_benchmark's name: :func:`vlm_jax.suites.clip_benchmark_dataset`),
    ``model`` (``config.name``), ``pretrained`` (the checkpoint directory, as CLIP_benchmark
    records a checkpoint file's path), ``task``, ``metrics`` and ``language``, plus ``entry``,
    ``split`` and ``step`` (CLIP_benchmark's ``build`` carries extra fields into its table as
    columns). Metric names are CLIP_benchmark's (:data:`CLIP_BENCHMARK_METRICS`: the linear
    probe's ``lp_acc1``..., captioning's ``CIDEr``...; the others are already). Files are named
    by CLIP_benchmark's default template ``{dataset}_{pretrained}_{model}_{language}_{task}.json``
    with ``/`` (and ``:``) as ``_`` and ``pretrained`` as ``<run>_step<N>`` (CLIP_benchmark uses
    a checkpoint file's base name, here always the step). Two entries of one call on the same dataset and task (two splits, two
    option sets) get ``/<entry>`` appended to the dataset name, so neither overwrites the other.
    """
    from vlm_jax import suites  # pylint: disable=import-outside-toplevel

    checkpoint = os.fspath(checkpoint)
    run = epath.Path(checkpoint).parent.parent.name or "run"
    evaluated = []
    for entry in entries:
        m = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(entry.name + "/")}
        if m:
            evaluated.append((entry, suites.clip_benchmark_dataset(entry.dataset, entry.split),
                              TASKS[entry.type], m))
    count: dict[tuple[str, str], int] = {}
    for _, dataset, task, _ in evaluated:
        count[dataset, task] = count.get((dataset, task), 0) + 1
    out = {}
    for entry, dataset, task, metrics in evaluated:
        if count[dataset, task] > 1:
            dataset = f"{dataset}/{entry.name}"
        name = CLIP_BENCHMARK_OUTPUT.format(dataset=dataset, pretrained=f"{run}_step{int(step)}",
                                            model=config.name, language=LANGUAGE, task=task)
        name = name.replace("/", "_").replace(":", "_")
        renamed = CLIP_BENCHMARK_METRICS.get(task, {})
        out[name] = {"dataset": dataset, "model": str(config.name), "pretrained": checkpoint,
                     "task": task, "metrics": {renamed.get(k, k): float(v)
                                               for k, v in metrics.items()},
                     "language": LANGUAGE, "entry": entry.name, "split": entry.split,
                     "step": int(step)}
    return out


def write_clip_benchmark(directory: epath.Path, config: ConfigDict, entries: Iterable[Entry],
                         step: int, results: Mapping[str, float], checkpoint: str | os.PathLike
                         ) -> list[epath.Path]:
    """Writes :func:`clip_benchmark_records` into ``directory`` (process 0), one file each, as
    CLIP_benchmark's ``eval`` does; ``clip_benchmark build <directory> --output table.csv``
    (its aggregation) reads them. A file of the same dataset, task and step is replaced. Returns
    the files."""
    records = clip_benchmark_records(config, entries, results, os.fspath(checkpoint), step)
    files = [directory / name for name in records]
    if jax.process_index() == 0 and records:
        directory.mkdir(parents=True, exist_ok=True)
        for path, record in zip(files, records.values()):
            path.write_text(json.dumps(record))  # json.dump, as CLIP_benchmark writes them
    return files


def caption_options(config: ConfigDict) -> dict[str, Any]:
    """The decoding options (``method``, ``beam_size``...) of the first ``captioning`` entry of
    ``config.evals`` ({} = greedy when there is none): ``vlm-jax caption``'s default."""
    evals = config.evals if "evals" in config else {}
    for entry in parse_entries(config, list(evals)):
        if entry.type == "captioning":
            return dict(entry.options)
    return {}


def _is_captions(tfds_name: str) -> bool:
    return tfds_name.split("/")[0].split(":")[0] in RETRIEVAL_DATASETS


def captions_per_image(retrieval: dict) -> list[list[str]]:
    """The captions of each image of a retrieval split (``caption`` + ``text_to_image``)."""
    per_image: list[list[str]] = [[] for _ in range(len(retrieval["image"]))]
    for caption, i in zip(retrieval["caption"], retrieval["text_to_image"]):
        per_image[int(i)].append(caption)
    return per_image
