"""CLIP: contrastive image-text dual encoder (OpenAI CLIP / open_clip semantics).

``image`` (:class:`~vlm_jax.models.vit.ViT`) and ``text``
(:class:`~vlm_jax.models.text.TextTransformer`) towers, bias-free linear projections
``image_projection`` / ``text_projection`` to ``embed_dim``, L2 normalisation and a learned
temperature ``logit_scale`` (stored as a log and exponentiated in the forward pass; the training
loop clamps the parameter to ``[0, logit_scale_max]`` after each update, as open_clip does).

Config (a dict or ml_collections ConfigDict)::

    model = dict(
      name='clip', embed_dim=512,
      image=dict(variant='B/32', image_size=224, pool_type='tok', pre_norm=True,
                 patch_bias=False, act='quick_gelu'),
      text=dict(width=512, depth=12, num_heads=8, mlp_dim=2048, vocab_size=49408,
                context_length=77, eos_id=49407, act='quick_gelu'),
      logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0),
      dtype='float32', remat='none', scan_layers=False)

``image`` takes any :class:`ViT` argument (explicit width/depth/... override ``variant``) and
``text`` any :class:`TextTransformer` argument. ``dtype``/``remat``/``scan_layers`` apply to both
towers unless a tower sets its own. CLIP defaults for the image tower (unless given): ``ln_eps``
1e-5, ``pre_norm`` True, ``patch_bias`` False, class token and position embeddings initialised
with std ``width ** -0.5``.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.models.text import TextTransformer, text_flops
from vlm_jax.models.vit import ViT, resolve_dims, vit_flops


def to_plain_dict(cfg: Any) -> dict:
    """A (nested) ConfigDict / Mapping as plain nested dicts (a copy)."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: to_plain_dict(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
                for k, v in cfg.items()}
    raise TypeError(f"Expected a dict or ConfigDict, got {type(cfg).__name__}.")


def accepted_keys(cls: type) -> set[str]:
    """Keyword arguments of ``cls.__init__`` (except ``rngs``): the valid config keys."""
    sig = inspect.signature(cls.__init__)
    return {n for n in sig.parameters if n not in ("self", "rngs")}


def check_keys(cfg: Mapping, allowed: set[str], where: str) -> None:
    """Raises ValueError naming the first key of ``cfg`` not in ``allowed``."""
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"Unknown key {where}.{unknown[0]} (all unknown: {unknown}); valid keys: "
                         f"{sorted(allowed)}.")


def from_config_dict(cls: type, cfg: Any, top_keys: set[str], *, rngs: nnx.Rngs):
    """``cls(**cfg)`` for a dual-tower model config (dict / ConfigDict): unknown keys and a
    missing ``embed_dim`` / ``image`` / ``text`` raise ValueError naming the key."""
    cfg = to_plain_dict(cfg)
    check_keys(cfg, top_keys, "model")
    cfg.pop("name", None)
    for k in ("embed_dim", "image", "text"):
        if k not in cfg:
            raise ValueError(f"{cls.__name__} config is missing model.{k}.")
    return cls(**cfg, rngs=rngs)


_TOP_KEYS = {"name", "embed_dim", "image", "text", "logit_scale_init", "logit_scale_max",
             "logit_bias_init", "project_image", "text_projection_bias", "dtype", "remat",
             "scan_layers", "ssl_prototypes", "ssl_hidden_dim", "ssl_bottleneck_dim"}
_SHARED = ("dtype", "remat", "scan_layers")


def image_kwargs(image: Mapping, shared: Mapping, where: str = "model.image") -> dict:
    """ViT arguments of a CLIP image tower: ``image`` (keys checked) with CLIP's defaults (LayerNorm
    eps 1e-5, pre-norm, no patch bias, init stds) and the model-wide ``shared`` settings."""
    kw = dict(image)
    check_keys(kw, accepted_keys(ViT), where)
    if kw.get("num_classes"):
        raise ValueError(f"{where}.num_classes must be 0 (features, not a classification "
                         "head).")
    for k in _SHARED:
        kw.setdefault(k, shared[k])
    dims = resolve_dims(kw.get("variant"), **{k: kw.get(k) for k in
                                              ("width", "depth", "mlp_dim", "num_heads",
                                               "patch_size")})
    kw.setdefault("ln_eps", 1e-5)
    kw.setdefault("pre_norm", True)
    kw.setdefault("patch_bias", False)
    kw.setdefault("pos_embed_std", dims["width"] ** -0.5)
    kw.setdefault("cls_std", dims["width"] ** -0.5)
    return kw


def tower_kwargs(cfg: Mapping, cls: type, where: str, shared: Mapping) -> dict:
    """A tower's constructor arguments: ``cfg`` (keys checked against ``cls``) with the
    model-wide ``dtype`` / ``remat`` / ``scan_layers`` as defaults."""
    kw = dict(cfg)
    check_keys(kw, accepted_keys(cls), where)
    for k in _SHARED:
        kw.setdefault(k, shared[k])
    return kw


def _text_kwargs(text: Mapping, shared: Mapping) -> dict:
    return tower_kwargs(text, TextTransformer, "model.text", shared)


class ProjectionHead(nnx.Module):
    """DINO's projection head (Caron et al. 2021), as SILC and TIPS use it: a 3-layer MLP (GELU)
    to a ``bottleneck`` feature, L2-normalised, then cosine logits against ``prototypes``
    L2-normalised columns (DINO's weight-normalised last layer with its norm fixed at 1).

    Parameters: ``fc1``, ``fc2``, ``fc3`` (kernel + bias), ``prototypes [bottleneck, K]``.
    """

    def __init__(self, width: int, hidden: int, bottleneck: int, prototypes: int, *,
                 dtype: layers.Dtype = "float32", rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(0.02)
        self.fc1 = layers.Dense(width, hidden, ("embed", "mlp"), kernel_init=init, dtype=dtype,
                                rngs=rngs)
        self.fc2 = layers.Dense(hidden, hidden, ("proj", "mlp"), kernel_init=init, dtype=dtype,
                                rngs=rngs)
        self.fc3 = layers.Dense(hidden, bottleneck, ("mlp", "proj"), kernel_init=init,
                                dtype=dtype, rngs=rngs)
        self.prototypes = layers.param(rngs, init, (bottleneck, prototypes), ("proj", "vocab"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., width]`` -> prototype logits ``[..., K]`` float32 (cosines, in [-1, 1])."""
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        x = jax.nn.gelu(self.fc2(x), approximate=False)
        x = layers.l2_normalize(self.fc3(x).astype(jnp.float32))
        w = layers.l2_normalize(self.prototypes[...].astype(jnp.float32).T).T
        return x @ w


class CLIP(nnx.Module):
    """CLIP dual encoder.

    Parameters: ``image.*`` (ViT), ``text.*`` (TextTransformer), ``image_projection.kernel
    [image_width, embed_dim]``, ``text_projection.kernel [text_width, embed_dim]`` (logical
    names ``('embed', 'proj')``), ``logit_scale`` (scalar, log of the inverse temperature) and,
    when ``logit_bias_init`` is set (SigLIP: ``logit_scale_init=log(10)``,
    ``logit_bias_init=-10``), a learned scalar ``logit_bias`` for the sigmoid loss.

    SigLIP's layout (big_vision ``two_towers`` with ``out_dim=(None, D)``, Hugging Face
    ``SiglipModel``): ``project_image=False`` takes the image tower's pooled feature (its MAP head
    output) as the embedding, without ``image_projection`` (``embed_dim`` must equal the image
    width); ``text_projection_bias=True`` gives ``text_projection`` a bias (the text ``head``).
    The defaults are CLIP's.

    SigLIP 2's self-supervised terms (:mod:`vlm_jax.distill`): ``ssl_prototypes=K > 0`` adds
    ``ssl_head`` (image-level) and ``ssl_patch_head`` (per patch) :class:`ProjectionHead` s onto
    ``K`` prototypes (hidden ``ssl_hidden_dim``, bottleneck ``ssl_bottleneck_dim``) and the
    masked-prediction ``ssl_mask_token [image width]``; 0 (the default) adds nothing.
    """

    def __init__(self, *, embed_dim: int, image: Mapping, text: Mapping,
                 logit_scale_init: float = math.log(1 / 0.07),
                 logit_scale_max: float = math.log(100.0), logit_bias_init: float | None = None,
                 project_image: bool = True, text_projection_bias: bool = False,
                 dtype: layers.Dtype = "float32", remat: str = "none", scan_layers: bool = False,
                 ssl_prototypes: int = 0, ssl_hidden_dim: int = 2048,
                 ssl_bottleneck_dim: int = 256, rngs: nnx.Rngs):
        shared = dict(dtype=dtype, remat=remat, scan_layers=scan_layers)
        self.embed_dim = int(embed_dim)
        self.logit_scale_max = float(logit_scale_max)
        self.dtype = layers.as_dtype(dtype)
        self.image = ViT(**image_kwargs(image, shared), rngs=rngs)
        self.text = TextTransformer(**_text_kwargs(text, shared), rngs=rngs)
        iw, tw = self.image.width, self.text.width
        if not project_image and iw != self.embed_dim:
            raise ValueError(f"model.project_image=False uses the image features as embeddings: "
                             f"model.embed_dim={self.embed_dim} must equal the image width {iw}.")
        self.image_projection = layers.Dense(
            iw, self.embed_dim, ("embed", "proj"), use_bias=False,
            kernel_init=nnx.initializers.normal(iw ** -0.5), dtype=dtype,
            rngs=rngs) if project_image else None
        self.text_projection = layers.Dense(
            tw, self.embed_dim, ("embed", "proj"), use_bias=bool(text_projection_bias),
            kernel_init=nnx.initializers.normal(tw ** -0.5), dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32), out_sharding=())
        self.logit_bias = (None if logit_bias_init is None else
                           nnx.Param(jnp.asarray(logit_bias_init, jnp.float32), out_sharding=()))
        head = dict(width=iw, hidden=int(ssl_hidden_dim), bottleneck=int(ssl_bottleneck_dim),
                    prototypes=int(ssl_prototypes), dtype=dtype)
        self.ssl_head = ProjectionHead(**head, rngs=rngs) if ssl_prototypes else None
        self.ssl_patch_head = ProjectionHead(**head, rngs=rngs) if ssl_prototypes else None
        self.ssl_mask_token = (layers.param(rngs, nnx.initializers.zeros, (iw,), ("embed",))
                               if ssl_prototypes else None)

    @classmethod
    def from_config(cls, cfg: Any, *, rngs: nnx.Rngs) -> "CLIP":
        """Builds from a model config dict / ConfigDict (see module docstring)."""
        return from_config_dict(cls, cfg, _TOP_KEYS, rngs=rngs)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, 3]`` -> L2-normalised ``[B, embed_dim]`` float32."""
        x = self.image(images)
        if self.image_projection is not None:
            x = self.image_projection(x)
        return layers.l2_normalize(x)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """``tokens int [B, L]`` -> L2-normalised ``[B, embed_dim]`` float32."""
        return layers.l2_normalize(self.text_projection(self.text(tokens)))

    def temperature(self) -> jax.Array:
        """``exp(logit_scale)`` (float32 scalar). The parameter is kept in ``[0,
        logit_scale_max]`` by the training loop after each update
        (:func:`vlm_jax.families.clip.after_update`), as open_clip does, not clipped here, where
        the clip would cut its gradient at the bound."""
        return jnp.exp(self.logit_scale[...].astype(jnp.float32))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        """Returns ``dict(image_emb [B, D], text_emb [B, D], logit_scale ())`` (plus
        ``logit_bias ()`` when the model has one); embeddings are normalised float32 and
        ``logit_scale`` is exponentiated."""
        out = dict(image_emb=self.encode_image(images), text_emb=self.encode_text(tokens),
                   logit_scale=self.temperature())
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias[...].astype(jnp.float32)
        return out


def tower_flops(cfg: Any) -> dict[str, float]:
    """Forward matmul FLOPs (2 x MACs) per example of each tower of a CLIP config, projection
    included: ``{'image': ViT + image_projection, 'text': text transformer (one full
    ``context_length`` sequence) + text_projection}``."""
    cfg = to_plain_dict(cfg)
    shared = {k: cfg.get(k, d) for k, d in zip(_SHARED, ("float32", "none", False))}
    image = image_kwargs(cfg["image"], shared)
    text = _text_kwargs(cfg["text"], shared)
    iw = resolve_dims(image.get("variant"), **{k: image.get(k) for k in
                                               ("width", "depth", "mlp_dim", "num_heads",
                                                "patch_size")})["width"]
    d = cfg["embed_dim"]
    image_flops = vit_flops(**{k: v for k, v in image.items()
                               if k in ("variant", "image_size", "pool_type", "width", "depth",
                                        "mlp_dim", "num_heads", "patch_size")})
    image_flops += 2.0 * iw * d if cfg.get("project_image", True) else 0.0
    return {"image": image_flops, "text": text_flops(**text) + 2.0 * text["width"] * d}


def clip_flops(cfg: Any, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs (2 x MACs) per image-text pair of a CLIP config.

    Image tower + text tower (one full ``context_length`` sequence) + both projections
    (:func:`tower_flops`). With ``batch_size`` the ``[B, B]`` similarity matmul
    (``2 * B * embed_dim`` per pair) is added.
    """
    towers = tower_flops(cfg)
    flops = towers["image"] + towers["text"]
    if batch_size:
        flops += 2.0 * batch_size * to_plain_dict(cfg)["embed_dim"]
    return flops


def _preset(embed_dim: int, variant: str, text_width: int, text_heads: int, text_depth: int,
            act: str, **image_overrides: Any) -> dict:
    return dict(
        name="clip", embed_dim=embed_dim,
        image=dict(variant=variant, image_size=224, pool_type="tok", pre_norm=True,
                   patch_bias=False, act=act, **image_overrides),
        text=dict(width=text_width, depth=text_depth, num_heads=text_heads,
                  mlp_dim=4 * text_width, vocab_size=49408, context_length=77, eos_id=49407,
                  act=act),
        logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0),
        dtype="float32", remat="none", scan_layers=False)


# OpenAI CLIP (quick_gelu) and open_clip LAION (gelu) architectures. open_clip's ViT-g/14 has
# width 1408, 40 layers, head width 88 (16 heads) and mlp_ratio 4.3637 -> mlp_dim 6144, which is
# big_vision's 'g'.
CLIP_PRESETS: dict[str, dict] = {
    "ViT-B/32": _preset(512, "B/32", 512, 8, 12, "quick_gelu"),
    "ViT-B/16": _preset(512, "B/16", 512, 8, 12, "quick_gelu"),
    "ViT-L/14": _preset(768, "L/14", 768, 12, 12, "quick_gelu"),
    "ViT-H/14": _preset(1024, "H/14", 1024, 16, 24, "gelu"),
    "ViT-g/14": _preset(1024, "g/14", 1024, 16, 24, "gelu"),
}


def clip_config(name: str) -> dict:
    """The model config dict of a CLIP preset (``'ViT-B/32'``; open_clip spelling ``'ViT-B-32'``
    also accepted). Returns a fresh copy that may be edited."""
    key = name
    if key not in CLIP_PRESETS and "-" in key:
        head, _, tail = key.rpartition("-")
        key = f"{head}/{tail}"
    if key not in CLIP_PRESETS:
        raise ValueError(f"Unknown CLIP preset {name!r}; available: {sorted(CLIP_PRESETS)}.")
    return copy.deepcopy(CLIP_PRESETS[key])


__all__ = ["CLIP", "CLIP_PRESETS", "clip_config", "clip_flops", "tower_flops", "to_plain_dict", "check_keys",
           "accepted_keys"]
