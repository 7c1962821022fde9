"""Flamingo: a frozen image encoder and a frozen language model joined by a trained perceiver
resampler and gated cross-attention, on interleaved image-text documents.

The model is :class:`vlm_jax.models.flamingo.Flamingo` (``config.model.vision``: a CLIP image
tower, ``config.model.lm``: a language model).
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax import data as data_lib
from vlm_jax.families import Family
from vlm_jax.families import lm
from vlm_jax.models import flamingo as flamingo_model


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.flamingo.Flamingo` from ``config.model`` (dict or ConfigDict)."""
    return flamingo_model.Flamingo.from_config(model_cfg, rngs=rngs)


def objective(model, batch, config, mesh):
    """Next-token cross-entropy of the text of interleaved documents, given their images."""
    del config, mesh
    return lm.next_token_objective(model(batch["images"], batch["tokens"]), batch)


def image_size(config) -> int:
    """The side of the images the vision encoder reads."""
    return config.model.vision.image_size


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """Documents: the language model's ``tokens`` / ``weights`` and ``images`` uint8
    ``[B, M, S, S, 3]`` (``M = config.data.max_images``, zero images after the document's)."""
    out = lm.document_batch_spec(config, config.model.lm)
    size = image_size(config)
    out["images"] = jax.ShapeDtypeStruct(
        (config.batch_size, data_lib.document_max_images(config), size, size, 3), np.uint8)
    return out


def make_data(config, for_eval: bool = False):
    """Interleaved image-text documents (:func:`vlm_jax.data.prepare_documents`): the shapes
    documents, or OBELICS / MMC4-layout webdataset tars (``config.data.name='webdataset'``);
    ``for_eval``: the training shards are not opened."""
    return data_lib.prepare_documents(config, lm=config.model.lm, image_size=image_size(config),
                                      for_eval=for_eval)


def run_tokenizer(config, workdir=None):
    """The language model's tokenizer, no data prepared (:func:`vlm_jax.data.document_tokenizer`)."""
    return data_lib.document_tokenizer(config, config.model.lm, workdir)


def default_evals(config) -> dict[str, dict]:
    """Few-shot VQA and captioning on 500 queries of the shapes test split, with 0, 4 and 8
    in-context examples from the first 1000 records of the train split."""
    del config
    options = dict(shots=[0, 4, 8], fewshot_pool=1000, fewshot_pool_split="train")
    return {kind: dict(type=kind, dataset="shapes", split="test", every_steps=0,
                       max_examples=500, options=dict(options))
            for kind in ("fewshot_vqa", "fewshot_captioning")}


def flops_per_example(model_cfg, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs of one document
    (:func:`vlm_jax.models.flamingo.flamingo_flops`)."""
    return float(flamingo_model.flamingo_flops(model_cfg, batch_size=batch_size))


FAMILY = Family(name="flamingo", build_model=build_model, objective=objective,
                batch_spec=batch_spec, make_data=make_data, default_evals=default_evals,
                flops_per_example=flops_per_example,
                capabilities=frozenset({"interleaved", "lm"}), image_size=image_size,
                run_tokenizer=run_tokenizer)
