"""CLIP and SigLIP: dual-encoder contrastive training on image-text pairs.

The two differ only in the loss (``config.loss.name``: ``'softmax'`` CLIP, ``'sigmoid'``
SigLIP) and SigLIP's learned logit bias (``config.model.logit_bias_init``); the model is
:class:`vlm_jax.models.clip.CLIP` (see that module for the config layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def embed(model, batch, config):
    """The per-example embeddings of a (micro-)batch: ``{'image_emb', 'text_emb'}`` (normalised
    float32), no local loss term."""
    del config
    out = model(batch["image"], batch["text"])
    return {"image_emb": out["image_emb"], "text_emb": out["text_emb"]}, 0.0, {}


@jax.named_scope("contrastive_loss")
def batch_loss(model, emb, config, mesh):
    """The contrastive loss over a whole batch's embeddings ``emb`` (:func:`embed`), across all
    devices (the global B x B logits are never built on one device), with the model's
    temperature (and SigLIP's bias).

    ``config.loss.name``: ``'softmax'`` (CLIP's symmetric InfoNCE,
    :func:`vlm_jax.losses.contrastive_loss`) or ``'sigmoid'`` (SigLIP,
    :func:`vlm_jax.losses.sigmoid_loss`; needs ``model.logit_bias_init``).
    ``config.loss.variant`` picks the distributed algorithm (``gather``, ``ring``, ``chunked``
    for softmax, ``ring_recompute`` in O(b x D) memory; ``ring``, ``gather``, ``ring_recompute`` for
    sigmoid).
    """
    name = config.loss.name
    if name not in LOSSES:
        raise ConfigError(f"config.loss.name={name!r}; valid: {list(LOSSES)}.")
    scale = model.temperature()
    bias = None if model.logit_bias is None else model.logit_bias[...].astype(jnp.float32)
    try:
        if name == "sigmoid":
            if bias is None:
                raise ConfigError("config.loss.name='sigmoid' needs a learned bias: set "
                                  "config.model.logit_bias_init (SigLIP: -10.0).")
            loss, metrics = losses.sigmoid_loss(
                emb["image_emb"], emb["text_emb"], scale, bias, mesh=mesh,
                variant=config.loss.variant)
        else:
            loss, metrics = losses.contrastive_loss(
                emb["image_emb"], emb["text_emb"], scale, mesh=mesh,
                **contrastive_kwargs(config.loss))
    except ValueError as e:
        if "variant" in str(e):
            raise ConfigError(f"config.loss.variant: {e}") from e
        raise
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics["train/logit_scale"] = scale
    if bias is not None:
        metrics["train/logit_bias"] = bias
    return loss, metrics


def objective(model, batch, config, mesh):
    """:func:`batch_loss` on the embeddings of the whole batch (:func:`embed`)."""
    emb, _, _ = embed(model, batch, config)
    return batch_loss(model, emb, config, mesh)


def after_update(params, config):
    """The learned temperature clamped to ``[0, logit_scale_max]`` after the update, as
    open_clip does (``logit_scale.clamp_(0, math.log(100))`` after ``optimizer.step()``): the
    forward pass uses the parameter as it is, so its gradient is never cut at the bound and it
    can come back down."""
    params = dict(params)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0,
                                     config.model.logit_scale_max)
    return params


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


def run_tokenizer(config, workdir=None):
    """The caption tokenizer of a run, no data prepared (:func:`vlm_jax.data.run_tokenizer`)."""
    return data_lib.run_tokenizer(config, workdir)


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
                image_size=image_size, embed=embed, batch_loss=batch_loss,
                after_update=after_update,
                run_tokenizer=run_tokenizer)
