"""CoCa (Yu et al. 2022): contrastive + captioning on image-text pairs.

The model is :class:`vlm_jax.models.coca.CoCa` (see that module for the config layout); the
data and batch are CLIP's.
"""

from __future__ import annotations

from vlm_jax import losses
from vlm_jax.config import ConfigError
from vlm_jax.families import Family
from vlm_jax.families import clip
from vlm_jax.models import coca as coca_model


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.coca.CoCa` from ``config.model`` (dict or ConfigDict)."""
    return coca_model.CoCa.from_config(model_cfg, rngs=rngs)


def objective(model, batch, config, mesh):
    """CoCa (open_clip's ``CoCaLoss``): ``contrastive_weight`` x the all-gather contrastive loss
    (any ``config.loss.variant``) + ``caption_weight`` x the captioning cross-entropy (teacher
    forcing, padding ignored). Defaults 1.0 and 2.0 as open_clip."""
    out = model(batch["image"], batch["text"])
    try:
        con, metrics = losses.contrastive_loss(out["image_emb"], out["text_emb"],
                                               out["logit_scale"], mesh=mesh,
                                               **clip.contrastive_kwargs(config.loss))
    except ValueError as e:
        if "variant" in str(e):
            raise ConfigError(f"config.loss.variant: {e}") from e
        raise
    cap = coca_model.captioning_loss(out["caption_logits"], batch["text"], model.pad_id)
    w_con = config.loss.contrastive_weight
    w_cap = config.loss.caption_weight
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics.update({"train/contrastive_loss": con, "train/caption_loss": cap,
                    "train/logit_scale": out["logit_scale"]})
    return w_con * con + w_cap * cap, metrics


def default_evals(config) -> dict[str, dict]:
    """CLIP's zero-shot and retrieval, and captioning (greedy decoding, CIDEr...) on the shapes
    test split."""
    return {**clip.default_evals(config),
            "captioning": clip.eval_entry("captioning", method="greedy")}


def flops_per_example(model_cfg, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs per image-text pair (:func:`vlm_jax.models.coca.coca_flops`)."""
    return float(coca_model.coca_flops(model_cfg, batch_size=batch_size))


FAMILY = Family(name="coca", build_model=build_model, objective=objective,
                batch_spec=clip.batch_spec, make_data=clip.make_data,
                default_evals=default_evals, flops_per_example=flops_per_example,
                capabilities=frozenset({"embed", "caption"}), image_size=clip.image_size)
