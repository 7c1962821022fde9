"""``vlm-jax data embed``: a locked image tower's embeddings of the training images, computed once.

    vlm-jax data embed --config experiments/lit_tiny_shapes.py --output /tmp/lit_emb
    vlm-jax train --config experiments/lit_tiny_shapes.py --workdir runs/lit_cached \\
        --config.data.name=image_embeddings --config.data.train_files=/tmp/lit_emb

A LiT run (:mod:`vlm_jax.families.lit`) locks its image tower; without augmentation an image
then has the same embedding every epoch, and the step need not run the tower at all. This pass
loads the tower as the run would (``config.init_from``, or ``--workdir``: the locked parts from
that run), embeds every training pair of ``config.data`` once, in the source's order, and
writes ArrayRecord shards (:func:`input_pipeline.sources.write_array_record_shard`, the writer of
``vlm-jax data convert``) of records ``{key, image_emb: float32 bytes, caption}`` plus an
``embeddings.json`` that describes them (the tower's config and ``init_from`` sources, the
data, the shard names). Training on them reads the same shuffled stream as the live pipeline
(:func:`input_pipeline.pipeline.create_embedding_iterator`).

Images get the evaluation transform (resize and centre crop: LiT trains its locked tower
without augmentation); raw image-text shards skip and count bad samples as training does. The
shapes train split is decoded as its training pipeline decodes it, so the cache holds exactly
the embeddings the live tower computes. Every process computes the embeddings (data-parallel
over all devices, :class:`vlm_jax.evaluators.common.FeatureExtractor`); process 0 writes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from input_pipeline import DataError, pipeline, sources
from input_pipeline import transforms as T
from vlm_jax import config as config_lib
from vlm_jax import data as data_lib
from vlm_jax.config import ConfigError
from vlm_jax.evaluators.common import FeatureExtractor
from vlm_jax.families import get_family, lit

SHARD_RECORDS = 100_000  # records per output shard (~0.3 GB at embed_dim 768)


class _Index(grain.transforms.MapWithIndex):
    """Adds the record's index in the source: the key of records without one (TFDS)."""

    def map_with_index(self, index: int, example: dict) -> dict:
        return {**example, "_index": index}


class _KeepCaption(grain.transforms.Map):
    """``{'image' uint8, 'caption' bytes, 'key' str}`` of a decoded example."""

    def map(self, example: dict) -> dict:
        caption = example["caption"]
        if isinstance(caption, np.ndarray):
            caption = caption.item()
        if isinstance(caption, str):
            caption = caption.encode("utf-8")
        key = example.get("key") or str(example.get("_index", ""))
        return {"image": example["image"], "caption": caption, "key": T.to_str(key)}


def _records(config: ConfigDict, data) -> tuple[grain.MapDataset, str]:
    """The training pairs of ``config.data`` in the source's order, decoded for the tower, and a
    description of the source."""
    d = config.data
    size = config.model.image.image_size
    if data.source is None:  # the shapes train split, decoded as its training pipeline does
        source, _ = pipeline._data_source(  # pylint: disable=protected-access
            data.data_dir, d.name, d.config_name, "train")
        ops = [T.DecodeImage(), T.ResizeCenterCrop(size)]
        what = f"{d.name}/{d.config_name} train"
    else:
        if isinstance(data.source, list) or isinstance(data.source, sources.WebDatasetShards):
            raise ConfigError("vlm-jax data embed reads an indexed source: a single "
                              "config.data.train_files (not a mixture, nor webdataset_mode="
                              "'stream' / 'resampled'); embed each part and train on one.")
        source = data.source
        ops = [T.DecodePair(d.min_side, filters=data_lib.sample_filters(config)), T.KeepValid(),
               T.ResizeCenterCrop(size)]
        what = repr(source)
    ds = grain.MapDataset.source(source).map_with_index(_Index())
    for op in ops:
        ds = ds.filter(op) if isinstance(op, grain.transforms.Filter) else ds.map(op)
    return ds.map(_KeepCaption()), what


def locked_parameters(config: ConfigDict, workdir: str | None = None
                      ) -> tuple[Any, Any, ConfigDict, dict]:
    """``(setup, params, config, init_from)`` of the LiT model as a run of ``config`` starts:
    fresh parameters with ``config.init_from`` loaded (or, with ``workdir``, the locked parts
    from that run's latest checkpoint). ``init_from``: the locked parts' sources, with the step
    read (what ``embeddings.json`` records)."""
    from vlm_jax import train  # pylint: disable=import-outside-toplevel

    parts = get_family(config).locked_parts(config)
    config = config.copy_and_resolve_references()
    if workdir:
        with config.unlocked():
            config.init_from = {**{k: dict(v) for k, v in config.init_from.items()},
                                **{p: {"workdir": str(workdir), "subtree": p} for p in parts}}
    s = train.setup(config)
    params = jax.jit(lambda: s.init_fn()["params"], out_shardings=s.param_shardings)()
    if config.init_from:
        params = train.load_pretrained(config, s, params)
    sources_ = {}
    for part in parts:
        if part in config.init_from:
            spec = dict(config.init_from[part])
            step = spec.get("step")
            if step is None:
                step = data_lib.latest_checkpoint_step(spec["workdir"])
            sources_[part] = {"workdir": str(spec["workdir"]),
                              "subtree": str(spec.get("subtree", "")), "step": step}
    return s, params, config, sources_


def embed_images(config: ConfigDict, output: str, workdir: str | None = None,
                 shard_records: int = SHARD_RECORDS) -> dict:
    """Writes the locked image tower's embeddings of ``config``'s training pairs to ``output``
    (ArrayRecord shards ``embeddings-NNNNN.array_record`` + ``embeddings.json``); returns the
    ``embeddings.json`` contents. See the module docstring.

    Raises:
        ConfigError: the config is not a LiT model with a locked image tower, its data is
            already cached embeddings, or ``output`` already holds embeddings.
    """
    family = get_family(config)
    if family.name != "lit" or lit.locked_tower(config.model) != "image":
        raise ConfigError("vlm-jax data embed computes a locked image tower's embeddings: "
                          "--config must be a LiT model (config.model.name='lit', "
                          "locked='image'), e.g. experiments/lit_tiny_shapes.py.")
    if config.data.name == data_lib.EMBEDDINGS:
        raise ConfigError("vlm-jax data embed reads images: config.data.name must be the "
                          "image-text data (shapes, webdataset, array_record, tfds), not "
                          f"{data_lib.EMBEDDINGS!r}.")
    out = epath.Path(output)
    if (out / data_lib.EMBEDDINGS_META).exists():
        raise ConfigError(f"--output {output} already holds embeddings "
                          f"({data_lib.EMBEDDINGS_META}); choose a new directory.")
    data = data_lib.prepare(config)
    s, params, config, init_from = locked_parameters(config, workdir)
    extractor = FeatureExtractor(s.graphdef, params, s.param_shardings, s.mesh, s.rules,
                                 config.eval.batch_size)
    ds, what = _records(config, data)
    main = jax.process_index() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    bs = extractor.batch_size
    batches = ds.to_iter_dataset(pipeline._read_options()).batch(  # pylint: disable=W0212
        bs, drop_remainder=False)
    shards, pending, n, t0 = [], [], 0, time.perf_counter()

    def flush():
        name = f"embeddings-{len(shards):05d}.array_record"
        if main:
            sources.write_array_record_shard(pending, str(out / name))
        shards.append(name)
        pending.clear()

    for batch in batches:
        emb = extractor.images(np.asarray(batch["image"]))
        for key, caption, e in zip(batch["key"], batch["caption"], emb):
            pending.append({"key": T.to_str(key), "caption": bytes(caption),
                            "image_emb": np.asarray(e, "<f4").tobytes()})
            n += 1
            if len(pending) == shard_records:
                flush()
    if pending:
        flush()
    if not n:
        raise DataError(f"{what}: no training pair to embed.")
    seconds = time.perf_counter() - t0
    d = config.data
    meta = {
        "tower": lit.tower_config(config.model), "locked": "image", "init_from": init_from,
        "data": {k: d[k] for k in ("name", "config_name", "train_files", "tokenizer",
                                   "eval_name")},
        "source": what, "num_records": n, "dim": int(config.model.embed_dim),
        "dtype": "float32", "shards": shards, "seconds": round(seconds, 1),
        "config": json.loads(config_lib.to_json(config)),
    }
    if main:  # Written last: a directory without it is an interrupted pass.
        (out / data_lib.EMBEDDINGS_META).write_text(json.dumps(meta, indent=1))
        print(f"Embedded {n} training pairs of {what} in {seconds:.1f} s into {len(shards)} "
              f"shard(s) in {output} (image_emb float32 [{meta['dim']}]). Train on them with "
              f"--config.data.name={data_lib.EMBEDDINGS} --config.data.train_files={output}")
    return meta
