"""CLIP and SigLIP: dual-encoder contrastive training on image-text pairs.

The two differ only in the loss (``config.loss.name``: ``'softmax'`` CLIP, ``'sigmoid'``
SigLIP) and SigLIP's learned logit bias (``config.model.logit_bias_init``); the model is
:class:`vlm_jax.models.clip.CLIP` (see that module for the config layout).
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax import data as data_lib
from vlm_jax import losses
from vlm_jax.config import ConfigError
from vlm_jax.families import Family
from vlm_jax.models.clip import CLIP, clip_flops

LOSSES = ("softmax", "sigmoid")


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.clip.CLIP` from ``config.model`` (dict or ConfigDict)."""
    return CLIP.from_config(model_cfg, rngs=rngs)


def objective(model, batch, config, mesh):
    """Dual-encoder contrastive training, across all devices (the global B x B logits are never
    built on one device).

    ``config.loss.name``: ``'softmax'`` (CLIP's symmetric InfoNCE,
    :func:`vlm_jax.losses.contrastive_loss`) or ``'sigmoid'`` (SigLIP,
    :func:`vlm_jax.losses.sigmoid_loss`; needs ``model.logit_bias_init``).
    ``config.loss.variant`` picks the distributed algorithm (``gather``, ``ring``, ``chunked``
    for softmax; ``ring``, ``gather`` for sigmoid).
    """
    name = config.loss.name
    if name not in LOSSES:
        raise ConfigError(f"config.loss.name={name!r}; valid: {list(LOSSES)}.")
    out = model(batch["image"], batch["text"])
    try:
        if name == "sigmoid":
            if "logit_bias" not in out:
                raise ConfigError("config.loss.name='sigmoid' needs a learned bias: set "
                                  "config.model.logit_bias_init (SigLIP: -10.0).")
            loss, metrics = losses.sigmoid_loss(
                out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"],
                mesh=mesh, variant=config.loss.variant)
        else:
            loss, metrics = losses.contrastive_loss(
                out["image_emb"], out["text_emb"], out["logit_scale"], mesh=mesh,
                **contrastive_kwargs(config.loss))
    except ValueError as e:
        if "variant" in str(e):
            raise ConfigError(f"config.loss.variant: {e}") from e
        raise
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics["train/logit_scale"] = out["logit_scale"]
    if "logit_bias" in out:
        metrics["train/logit_bias"] = out["logit_bias"]
    return loss, metrics


def contrastive_kwargs(loss_config) -> dict:
    """Keyword arguments of :func:`vlm_jax.losses.contrastive_loss` from ``config.loss``."""
    kwargs = {"variant": loss_config.variant}
    if loss_config.variant == "chunked" and loss_config.chunk_size:  # 0: the default.
        kwargs["chunk_size"] = loss_config.chunk_size
    return kwargs


def image_size(config) -> int:
    """The side of the images the image tower reads."""
    return config.model.image.image_size


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """Image-text pairs: ``image`` uint8 ``[B, S, S, 3]``, ``text`` int32 ``[B, L]``."""
    return pair_batch_spec(config, image_size(config), config.model.text.context_length)


def pair_batch_spec(config, size: int, context_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The image-text batch of CLIP, SigLIP and CoCa (global shapes, no sharding)."""
    b = config.batch_size
    return {"image": jax.ShapeDtypeStruct((b, size, size, 3), np.uint8),
            "text": jax.ShapeDtypeStruct((b, context_length), np.int32)}


def make_data(config, for_eval: bool = False):
    """The shapes pairs or raw image-text shards (:func:`vlm_jax.data.prepare`)."""
    return data_lib.prepare(config, for_eval=for_eval)


def eval_entry(kind: str, split: str = "test", **options) -> dict:
    """One entry of ``config.evals`` on the shapes data (at the run's ``data.config_name``),
    run at the end of training (``every_steps`` 0), on the whole split."""
    return dict(type=kind, dataset="shapes", split=split, every_steps=0, max_examples=0,
                options=options)


def default_evals(config) -> dict[str, dict]:
    """Zero-shot classification and image-text retrieval on the shapes test split."""
    del config
    return {"zeroshot": eval_entry("zeroshot"), "retrieval": eval_entry("retrieval")}


def flops_per_example(model_cfg, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs per image-text pair (:func:`vlm_jax.models.clip.clip_flops`)."""
    return float(clip_flops(model_cfg, batch_size=batch_size))


FAMILY = Family(name="clip", build_model=build_model, objective=objective,
                batch_spec=batch_spec, make_data=make_data, default_evals=default_evals,
                flops_per_example=flops_per_example, capabilities=frozenset({"embed"}),
                image_size=image_size)
