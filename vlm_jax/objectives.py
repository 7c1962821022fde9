"""Training objectives, one per model family: ``objective(model, batch, config, mesh)``.

Each returns ``(loss, metrics)`` for a *global* batch (jax.Arrays sharded over the mesh's batch
axes). The train loop is shared by every model; a model family only supplies its objective here.
"""

from __future__ import annotations

from collections.abc import Callable

from vlm_jax import losses
from vlm_jax.config import ConfigError


def clip_objective(model, batch, config, mesh):
    """CLIP: symmetric InfoNCE between image and text embeddings, across all devices."""
    out = model(batch["image"], batch["text"])
    loss, metrics = losses.contrastive_loss(out["image_emb"], out["text_emb"], out["logit_scale"],
                                            mesh=mesh, variant=config.loss.variant)
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics["train/logit_scale"] = out["logit_scale"]
    return loss, metrics


OBJECTIVES: dict[str, Callable] = {"clip": clip_objective}


def get_objective(name: str) -> Callable:
    """The objective of model family ``name`` (``config.model.name``)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"config.model.name={name!r} has no training objective; available: "
                          f"{sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]
