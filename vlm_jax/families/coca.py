"""CoCa (Yu et al. 2022): contrastive + captioning on image-text pairs.

The model is :class:`vlm_jax.models.coca.CoCa` (see that module for the config layout); the
data and batch are CLIP's.
"""

from __future__ import annotations

from vlm_jax.families import Family
from vlm_jax.families import clip
from vlm_jax.models import coca as coca_model


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.coca.CoCa` from ``config.model`` (dict or ConfigDict)."""
    return coca_model.CoCa.from_config(model_cfg, rngs=rngs)


def embed(model, batch, config):
    """The embeddings of a (micro-)batch and its captioning term: ``caption_weight`` x the
    captioning cross-entropy (teacher forcing, padding ignored; a mean over the micro-batch's
    tokens)."""
    out = model(batch["image"], batch["text"])
    cap = coca_model.captioning_loss(out["caption_logits"], batch["text"], model.pad_id)
    emb = {"image_emb": out["image_emb"], "text_emb": out["text_emb"]}
    return emb, config.loss.caption_weight * cap, {"train/caption_loss": cap}


def batch_loss(model, emb, config, mesh):
    """``contrastive_weight`` x CLIP's contrastive loss (:func:`vlm_jax.families.clip.batch_loss`:
    any ``config.loss.variant``) over the whole batch's embeddings."""
    con, metrics = clip.batch_loss(model, emb, config, mesh)
    metrics["train/contrastive_loss"] = con
    return config.loss.contrastive_weight * con, metrics


def objective(model, batch, config, mesh):
    """CoCa (open_clip's ``CoCaLoss``): ``contrastive_weight`` x contrastive +
    ``caption_weight`` x captioning, open_clip's 1.0 and 2.0 by default."""
    emb, cap, cap_metrics = embed(model, batch, config)
    con, metrics = batch_loss(model, emb, config, mesh)
    return con + cap, {**metrics, **cap_metrics}


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
                capabilities=frozenset({"embed", "caption"}), image_size=clip.image_size,
                embed=embed, batch_loss=batch_loss, after_update=clip.after_update,
                run_tokenizer=clip.run_tokenizer)
