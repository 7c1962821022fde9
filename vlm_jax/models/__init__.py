"""vlm_jax models, one per file, and parameter counting.

* :class:`~vlm_jax.models.clip.CLIP` (CLIP, SigLIP), :class:`~vlm_jax.models.coca.CoCa`,
  :class:`~vlm_jax.models.flamingo.Flamingo` (frozen ViT + frozen LM, trained resampler and
  gated cross-attention), :class:`~vlm_jax.models.lm.LanguageModel` (LLaMA- or GPT-2-style),
  each with ``from_config(cfg, rngs=...)`` and an analytic FLOPs function (``clip_flops``...).
* :class:`~vlm_jax.models.vit.ViT` alone, e.g. ``ViT(variant='B/16', image_size=224,
  num_classes=1000, rngs=...)``.

A run builds its model through its family (:func:`vlm_jax.families.get_family`, from the model
config's ``name``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from vlm_jax.models import layers  # noqa: F401  (imported first: the towers use it)
from vlm_jax.models.clip import CLIP, CLIP_PRESETS, clip_config, clip_flops
from vlm_jax.models.coca import CoCa, coca_flops
from vlm_jax.models.flamingo import Flamingo, flamingo_flops
from vlm_jax.models.lm import LanguageModel, lm_flops
from vlm_jax.models.text import TextTransformer
from vlm_jax.models.vit import VARIANTS, ViT, decode_variant, vit_flops


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


__all__ = [
    "count_params", "CLIP", "CLIP_PRESETS", "clip_config", "clip_flops", "CoCa", "coca_flops",
    "Flamingo", "flamingo_flops", "LanguageModel", "lm_flops", "ViT", "VARIANTS",
    "decode_variant", "vit_flops", "TextTransformer",
]
