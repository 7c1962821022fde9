"""vlm_jax models: registry, parameter counting and analytic FLOPs.

``build_model(cfg, rngs=...)`` dispatches on ``cfg.name``:

* ``'clip'``: :class:`~vlm_jax.models.clip.CLIP` (see that module for the config layout).
* ``'coca'``: :class:`~vlm_jax.models.coca.CoCa` (see that module for the config layout).
* ``'flamingo'``: :class:`~vlm_jax.models.flamingo.Flamingo` (frozen ViT + frozen LM, trained
  resampler and gated cross-attention).
* ``'lm'``: :class:`~vlm_jax.models.lm.LanguageModel` (LLaMA- or GPT-2-style decoder).
* ``'vit'``: :class:`~vlm_jax.models.vit.ViT`; every other key of the config is a ViT argument,
  e.g. ``dict(name='vit', variant='B/16', image_size=224, num_classes=1000)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from vlm_jax.models import layers  # noqa: F401  (imported first: the towers use it)
from vlm_jax.models.clip import (CLIP, CLIP_PRESETS, accepted_keys, check_keys, clip_config,
                                 clip_flops, to_plain_dict)
from vlm_jax.models.coca import CoCa, coca_flops
from vlm_jax.models.flamingo import Flamingo, flamingo_flops
from vlm_jax.models.lm import LanguageModel, lm_flops
from vlm_jax.models.text import TextTransformer
from vlm_jax.models.vit import VARIANTS, ViT, decode_variant, vit_flops


def _build_clip(cfg: dict, rngs: nnx.Rngs) -> nnx.Module:
    return CLIP.from_config(cfg, rngs=rngs)


def _build_coca(cfg: dict, rngs: nnx.Rngs) -> nnx.Module:
    return CoCa.from_config(cfg, rngs=rngs)


def _build_flamingo(cfg: dict, rngs: nnx.Rngs) -> nnx.Module:
    return Flamingo.from_config(cfg, rngs=rngs)


def _build_lm(cfg: dict, rngs: nnx.Rngs) -> nnx.Module:
    return LanguageModel.from_config(cfg, rngs=rngs)


def _lm_flops(cfg: dict, batch_size: int | None = None) -> float:
    del batch_size
    return lm_flops(**{k: v for k, v in cfg.items() if k != "name"})


def _build_vit(cfg: dict, rngs: nnx.Rngs) -> nnx.Module:
    cfg = dict(cfg)
    cfg.pop("name", None)
    check_keys(cfg, accepted_keys(ViT), "model")
    return ViT(**cfg, rngs=rngs)


def _vit_flops(cfg: dict, batch_size: int | None = None) -> float:
    del batch_size
    keys = ("variant", "image_size", "pool_type", "num_classes", "width", "depth", "mlp_dim",
            "num_heads", "patch_size")
    return vit_flops(**{k: v for k, v in cfg.items() if k in keys})


# name -> (builder, flops function)
MODELS: dict[str, tuple[Callable[[dict, nnx.Rngs], nnx.Module], Callable[..., float]]] = {
    "clip": (_build_clip, clip_flops),
    "coca": (_build_coca, coca_flops),
    "flamingo": (_build_flamingo, flamingo_flops),
    "lm": (_build_lm, _lm_flops),
    "vit": (_build_vit, _vit_flops),
}


def _name_of(cfg: dict) -> str:
    name = cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"Unknown model.name {name!r}; available models: {sorted(MODELS)}.")
    return name


def build_model(model_cfg: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by ``model_cfg.name`` (dict or ConfigDict).

    Unknown config keys raise ValueError naming the key. Use under ``nnx.eval_shape`` to get an
    abstract model (no memory), e.g. for :func:`count_params` or sharding planning.
    """
    cfg = to_plain_dict(model_cfg)
    return MODELS[_name_of(cfg)][0](cfg, rngs)


def count_params(model_or_state: Any) -> int:
    """Number of parameter scalars of a module (real or from ``nnx.eval_shape``), an
    ``nnx.State`` or any pytree of arrays / ``ShapeDtypeStruct``s."""
    tree = model_or_state
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    total = 0
    for leaf in leaves:
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        total += math.prod(getattr(value, "shape", ()))
    return int(total)


def flops_per_example(model_cfg: Any, batch_size: int | None = None) -> float:
    """Analytic forward-pass matmul FLOPs (2 x MACs) per example (image-text pair for CLIP).

    Counts the patch embedding, q/k/v/out and MLP matmuls, attention scores and weighted values
    (full, no causal discount), MAP head, classifier head and contrastive projections; not
    LayerNorm, softmax, activations or embedding lookups. With ``batch_size`` the CLIP
    similarity matrix (``2 * batch_size * embed_dim`` per pair) is included. Training FLOPs
    are ``3x`` this (forward + backward); MFU = 3 * flops * examples/s / peak FLOP/s.
    Matches open_clip's ``model_profile.csv`` GFLOPs (e.g. 41.09 G for ViT-B-16).
    """
    cfg = to_plain_dict(model_cfg)
    return float(MODELS[_name_of(cfg)][1](cfg, batch_size=batch_size))


__all__ = [
    "MODELS", "build_model", "count_params", "flops_per_example", "CLIP", "CLIP_PRESETS",
    "clip_config", "ViT", "VARIANTS", "decode_variant", "TextTransformer",
]
