"""Decoder-only language model (LLaMA- or GPT-2-style) on the interleaved shapes texts.

The model is :class:`vlm_jax.models.lm.LanguageModel`; its batches are packed rows of documents
(:mod:`input_pipeline.interleaved`), ``tokens`` with the ``weights`` of the target tokens.
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax import data as data_lib
from vlm_jax.families import Family
from vlm_jax.models import lm as lm_model
from vlm_jax.models.clip import to_plain_dict


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.lm.LanguageModel` from ``config.model`` (dict or ConfigDict)."""
    return lm_model.LanguageModel.from_config(model_cfg, rngs=rngs)


def next_token_objective(logits, batch):
    """Next-token cross-entropy over ``batch['tokens']``, weighted by ``batch['weights']`` (the
    target tokens: text, ``<|endofchunk|>``, ``eos``; see :mod:`input_pipeline.interleaved`)."""
    loss, n = lm_model.next_token_loss(logits, batch["tokens"], batch["weights"])
    return loss, {"train/target_tokens": n}


def objective(model, batch, config, mesh):
    """Next-token cross-entropy of the language model on text rows."""
    del config, mesh
    return next_token_objective(model(batch["tokens"]), batch)


def document_batch_spec(config, lm_cfg) -> dict[str, jax.ShapeDtypeStruct]:
    """``tokens`` int32 and ``weights`` float32 ``[B, T]``, ``T`` the training sequence length
    (:func:`vlm_jax.data.document_length`)."""
    shape = (config.batch_size, data_lib.document_length(config, lm_cfg))
    return {"tokens": jax.ShapeDtypeStruct(shape, np.int32),
            "weights": jax.ShapeDtypeStruct(shape, np.float32)}


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """Packed text rows: ``tokens`` int32 and ``weights`` float32 ``[B, T]``."""
    return document_batch_spec(config, config.model)


def make_data(config, for_eval: bool = False):
    """Text documents (:func:`vlm_jax.data.prepare_documents`): the interleaved shapes documents
    without their images, or a text corpus (``config.data.name`` tfds / jsonl / array_record);
    ``for_eval``: the training files are not opened."""
    return data_lib.prepare_documents(config, lm=config.model, for_eval=for_eval)


def run_tokenizer(config, workdir=None):
    """The run's tokenizer, no data prepared (:func:`vlm_jax.data.document_tokenizer`)."""
    return data_lib.document_tokenizer(config, config.model, workdir)


def default_evals(config) -> dict[str, dict]:
    """Held-out loss and perplexity on 256 documents of the shapes validation split."""
    del config
    return {"lm_loss": dict(type="lm_loss", dataset="shapes", split="validation", every_steps=0,
                            max_examples=256, options={})}


def image_size(config) -> None:
    """Text only: the language model reads no image."""
    del config


def flops_per_example(model_cfg, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs of one ``max_length`` sequence (:func:`vlm_jax.models.lm.lm_flops`)."""
    del batch_size
    cfg = to_plain_dict(model_cfg)
    cfg.pop("name", None)
    return float(lm_model.lm_flops(**cfg))


FAMILY = Family(name="lm", build_model=build_model, objective=objective,
                batch_spec=batch_spec, make_data=make_data, default_evals=default_evals,
                flops_per_example=flops_per_example, capabilities=frozenset({"lm"}),
                image_size=image_size, run_tokenizer=run_tokenizer)
