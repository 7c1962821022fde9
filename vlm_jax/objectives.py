"""Training objectives, one per model family: ``objective(model, batch, config, mesh)``.

Each returns ``(loss, metrics)`` for a *global* batch (jax.Arrays sharded over the mesh's batch
axes). The train loop is shared by every model; a model family only supplies its objective here.
"""

from __future__ import annotations

from collections.abc import Callable

from vlm_jax import losses
from vlm_jax.config import ConfigError


LOSSES = ("softmax", "sigmoid")


def clip_objective(model, batch, config, mesh):
    """Dual-encoder contrastive training, across all devices (the global B x B logits are never
    built on one device).

    ``config.loss.name``: ``'softmax'`` (CLIP's symmetric InfoNCE,
    :func:`vlm_jax.losses.contrastive_loss`) or ``'sigmoid'`` (SigLIP,
    :func:`vlm_jax.losses.sigmoid_loss`; needs ``model.logit_bias_init``).
    ``config.loss.variant`` picks the distributed algorithm (``gather``, ``ring``, ``chunked``
    for softmax; ``ring``, ``gather`` for sigmoid).
    """
    name = config.loss.get("name", "softmax")
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
                **_variant_kwargs(config.loss))
    except ValueError as e:
        if "variant" in str(e):
            raise ConfigError(f"config.loss.variant: {e}") from e
        raise
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics["train/logit_scale"] = out["logit_scale"]
    if "logit_bias" in out:
        metrics["train/logit_bias"] = out["logit_bias"]
    return loss, metrics


def _variant_kwargs(loss_config) -> dict:
    """Keyword arguments of :func:`vlm_jax.losses.contrastive_loss` from ``config.loss``."""
    kwargs = {"variant": loss_config.variant}
    if loss_config.variant == "chunked" and loss_config.get("chunk_size"):  # 0: the default.
        kwargs["chunk_size"] = loss_config.chunk_size
    return kwargs


def coca_objective(model, batch, config, mesh):
    """CoCa (Yu et al. 2022; open_clip's ``CoCaLoss``): ``contrastive_weight`` x the all-gather
    contrastive loss (any ``config.loss.variant``) + ``caption_weight`` x the captioning
    cross-entropy (teacher forcing, padding ignored). Defaults 1.0 and 2.0 as open_clip."""
    from vlm_jax.models import coca  # pylint: disable=import-outside-toplevel

    out = model(batch["image"], batch["text"])
    try:
        con, metrics = losses.contrastive_loss(out["image_emb"], out["text_emb"],
                                               out["logit_scale"], mesh=mesh,
                                               **_variant_kwargs(config.loss))
    except ValueError as e:
        if "variant" in str(e):
            raise ConfigError(f"config.loss.variant: {e}") from e
        raise
    cap = coca.captioning_loss(out["caption_logits"], batch["text"], model.pad_id)
    w_con = config.loss.get("contrastive_weight", 1.0)
    w_cap = config.loss.get("caption_weight", 2.0)
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics.update({"train/contrastive_loss": con, "train/caption_loss": cap,
                    "train/logit_scale": out["logit_scale"]})
    return w_con * con + w_cap * cap, metrics


def lm_objective(model, batch, config, mesh):
    """Next-token cross-entropy over ``batch['tokens']``, weighted by ``batch['weights']`` (the
    target tokens: text, ``<|endofchunk|>``, ``eos``; see :mod:`input_pipeline.interleaved`).
    For the language model (``tokens``) and Flamingo (``images`` + ``tokens``)."""
    del config, mesh
    from vlm_jax.models.lm import next_token_loss  # pylint: disable=import-outside-toplevel

    if "images" in batch:
        logits = model(batch["images"], batch["tokens"])
    else:
        logits = model(batch["tokens"])
    loss, n = next_token_loss(logits, batch["tokens"], batch["weights"])
    return loss, {"train/target_tokens": n}


OBJECTIVES: dict[str, Callable] = {"clip": clip_objective, "coca": coca_objective,
                                   "lm": lm_objective, "flamingo": lm_objective}


def get_objective(name: str) -> Callable:
    """The objective of model family ``name`` (``config.model.name``)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"config.model.name={name!r} has no training objective; available: "
                          f"{sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]
