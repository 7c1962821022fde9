"""Vision Transformer (ViT) image encoder, big_vision / timm / OpenAI-CLIP flavours.

Sizes by name as in big_vision: ``decode_variant('B/16')``. The patch embedding is a strided
convolution written as a reshape + einsum with kernel ``[p, p, 3, width]`` (identical to
``Conv(stride=p, padding='VALID')`` in NHWC/HWIO layout).

Flavours, by option:

* big_vision: ``pool_type='gap'|'map'|'tok'``, ``patch_bias=True``, ``pre_norm=False``,
  ``ln_eps=1e-6``. (big_vision adds the position embedding *before* concatenating the class
  token; here, as timm and CLIP do, the class token has a position too.)
* timm ``vit_base_patch16_224``: ``pool_type='tok'``, ``patch_bias=True``, ``num_classes=1000``.
* OpenAI CLIP visual: ``pool_type='tok'``, ``patch_bias=False``, ``pre_norm=True`` (``ln_pre``),
  ``ln_eps=1e-5``, ``act='quick_gelu'``; the final norm is ``ln_post``. open_clip's
  ``pool_type='avg'`` is ``'avg'`` here: the class token stays in the sequence and the patch
  tokens are averaged.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.parallel import constrain

# name -> (width, depth, mlp_dim, num_heads); big_vision/models/vit.py numbers.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

POOL_TYPES = ("tok", "gap", "map", "avg")


def has_cls_token(pool_type: str) -> bool:
    """Whether a ViT of this ``pool_type`` prepends a class token (``'tok'`` and ``'avg'``)."""
    return pool_type in ("tok", "avg")


def decode_variant(variant: str) -> dict[str, int]:
    """``'B/16'`` -> ``dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)``.

    The patch size is optional (``'B'`` gives no ``patch_size`` key). Raises ValueError for an
    unknown size name.
    """
    m = re.fullmatch(r"([A-Za-z0-9]+)(?:/(\d+))?", variant.strip())
    if m is None or m.group(1) not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {variant!r}; expected '<size>/<patch>' with size "
                         f"in {list(VARIANTS)} (e.g. 'B/16').")
    width, depth, mlp_dim, num_heads = VARIANTS[m.group(1)]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if m.group(2):
        out["patch_size"] = int(m.group(2))
    return out


def resolve_dims(variant: str | None = None, **overrides: Any) -> dict[str, int]:
    """Width/depth/mlp_dim/num_heads/patch_size from a variant plus explicit overrides."""
    dims = decode_variant(variant) if variant else {}
    for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
        if overrides.get(k) is not None:
            dims[k] = int(overrides[k])
    missing = [k for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size")
               if k not in dims]
    if missing:
        raise ValueError(f"ViT config is missing {missing}: give a variant like 'B/16' or the "
                         "sizes explicitly.")
    return dims


def _pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {x}.")
    return x  # type: ignore[return-value]


def set_geometry(module: nnx.Module, variant: str | None, image_size, **dims: Any) -> None:
    """Sets a ViT tower's ``width``, ``depth``, ``mlp_dim``, ``num_heads``, ``patch_size`` and
    ``image_size`` (h, w) from a variant name and overrides; the image must tile into patches."""
    d = resolve_dims(variant, **dims)
    module.width, module.depth = d["width"], d["depth"]
    module.mlp_dim, module.num_heads = d["mlp_dim"], d["num_heads"]
    module.patch_size = p = d["patch_size"]
    module.image_size = _pair(image_size)
    h, w = module.image_size
    if h % p or w % p:
        raise ValueError(f"image_size {h}x{w} is not divisible by patch_size {p}.")


class PatchEmbed(nnx.Module):
    """Non-overlapping patch embedding: ``kernel [p, p, 3, width]`` (+ optional ``bias``)."""

    def __init__(self, patch_size: int, width: int, *, channels: int = 3, use_bias: bool = True,
                 dtype: layers.Dtype = jnp.float32, pixel_mean=None, pixel_std=None,
                 rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.channels = channels
        # Static per-channel statistics of uint8 input (None: CLIP's), not parameters.
        self.pixel_mean = None if pixel_mean is None else tuple(float(v) for v in pixel_mean)
        self.pixel_std = None if pixel_std is None else tuple(float(v) for v in pixel_std)
        self.dtype = layers.as_dtype(dtype)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=(0, 1, 2), out_axis=3)
        self.kernel = layers.param(rngs, init, (patch_size, patch_size, channels, width),
                                   ("patch", "patch", "patch", "embed"))
        self.bias = (layers.param(rngs, nnx.initializers.zeros, (width,), ("embed",))
                     if use_bias else None)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, C]`` (normalised floats, or uint8 pixels normalised here with
        CLIP's statistics or the tower's ``pixel_mean`` / ``pixel_std``) ->
        ``[B, (H/p) * (W/p), width]``."""
        b, h, w, c = images.shape
        p = self.patch_size
        x = layers.normalize_pixels(images, self.dtype, self.pixel_mean, self.pixel_std)
        x = x.reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("bhpwqc,pqcd->bhwd", x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            x = x + self.bias[...].astype(self.dtype)
        return x.reshape(b, (h // p) * (w // p), x.shape[-1])


class ViT(nnx.Module):
    """Vision Transformer: ``images [B, H, W, 3] -> [B, width]`` (or ``[B, num_classes]``).

    Args:
      variant: size name such as ``'B/16'``; ``width``, ``depth``, ``mlp_dim``, ``num_heads``,
        ``patch_size`` override it (or replace it when ``variant`` is None).
      image_size: int or (H, W); fixes the number of position embeddings.
      pool_type: ``'tok'`` (class token), ``'gap'`` (mean of tokens, no class token), ``'avg'``
        (mean of the patch tokens, a class token in the sequence: open_clip's
        ``pool_type='avg'``) or ``'map'`` (:class:`~vlm_jax.models.layers.MAPHead`).
      pre_norm: LayerNorm after adding position embeddings (OpenAI CLIP ``ln_pre``).
      patch_bias: bias in the patch embedding (False for OpenAI CLIP).
      act: MLP activation (``'gelu'`` exact, ``'gelu_tanh'``, ``'quick_gelu'``).
      pixel_mean / pixel_std: RGB statistics (on [0, 1] values) that uint8 images are
        normalised with; default CLIP's (SigLIP: 0.5, 0.5).
      ln_eps: LayerNorm epsilon (1e-6 big_vision, 1e-5 CLIP/timm).
      num_classes: size of a linear classification head on the pooled feature; 0 = no head.
      pos_embed_std / cls_std: init std of position embeddings / class token (0.02 / 0 as
        big_vision and timm; CLIP uses ``width ** -0.5`` for both).
      dtype: compute dtype; remat: per-block remat policy name; scan_layers: stack blocks.
      pixel_mean / pixel_std: per-channel statistics that normalise uint8 input (on the [0, 1]
        scale; None: CLIP's, :data:`vlm_jax.models.layers.PIXEL_MEAN` / ``PIXEL_STD``).

    Parameters: ``patch_embed.kernel``, ``patch_embed.bias``, ``cls_token [width]``,
    ``pos_embed [tokens, width]``, ``pre_norm``, ``encoder.blocks.{i}...``, ``final_norm``,
    ``map_head``, ``head``.
    """

    def __init__(self, variant: str | None = None, *, width: int | None = None,
                 depth: int | None = None, mlp_dim: int | None = None,
                 num_heads: int | None = None, patch_size: int | None = None,
                 image_size: int | tuple[int, int] = 224, pool_type: str = "tok",
                 pre_norm: bool = False, patch_bias: bool = True, act: str = "gelu",
                 ln_eps: float = 1e-6, num_classes: int = 0, pos_embed_std: float = 0.02,
                 cls_std: float = 0.0, dtype: layers.Dtype = "float32", remat: str = "none",
                 scan_layers: bool = False, pixel_mean: tuple[float, ...] | None = None,
                 pixel_std: tuple[float, ...] | None = None, rngs: nnx.Rngs):
        set_geometry(self, variant, image_size, width=width, depth=depth, mlp_dim=mlp_dim,
                     num_heads=num_heads, patch_size=patch_size)
        p = self.patch_size
        if pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {pool_type!r}; use one of {POOL_TYPES}.")
        self.pool_type = pool_type
        self.num_patches = (self.image_size[0] // p) * (self.image_size[1] // p)
        self.num_classes = int(num_classes)
        self.dtype = layers.as_dtype(dtype)
        width = self.width

        self.patch_embed = PatchEmbed(p, width, use_bias=patch_bias, dtype=dtype,
                                      pixel_mean=pixel_mean, pixel_std=pixel_std, rngs=rngs)
        if has_cls_token(pool_type):
            init = (nnx.initializers.normal(cls_std) if cls_std else nnx.initializers.zeros)
            self.cls_token = layers.param(rngs, init, (width,), ("embed",))
        else:
            self.cls_token = None
        n_tokens = self.num_patches + has_cls_token(pool_type)
        self.pos_embed = layers.param(rngs, nnx.initializers.normal(pos_embed_std),
                                      (n_tokens, width), ("pos", "embed"))
        self.pre_norm = (layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
                         if pre_norm else None)
        self.encoder = layers.Encoder(self.depth, width, self.num_heads, self.mlp_dim, act=act,
                                      causal=False, ln_eps=ln_eps, dtype=dtype, remat=remat,
                                      scan_layers=scan_layers, rngs=rngs)
        self.final_norm = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.map_head = (layers.MAPHead(width, self.num_heads, self.mlp_dim, act=act,
                                        ln_eps=ln_eps, dtype=dtype, rngs=rngs)
                         if pool_type == "map" else None)
        self.head = (layers.Dense(width, self.num_classes, ("embed", "proj"),
                                  kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)
                     if self.num_classes else None)

    def _check(self, images: jax.Array, any_size: bool = False) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ViT expects images [batch, height, width, 3] (NHWC), got shape "
                             f"{tuple(images.shape)}.")
        _, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"Image size {h}x{w} is not divisible by patch_size {p}.")
        if (h, w) != self.image_size and not any_size:
            raise ValueError(f"Image size {h}x{w} differs from the image_size "
                             f"{self.image_size[0]}x{self.image_size[1]} this ViT was built for "
                             "(position embeddings are not interpolated).")

    def encode_tokens(self, images: jax.Array, *, mask: jax.Array | None = None,
                      mask_token: jax.Array | None = None, any_size: bool = False
                      ) -> jax.Array:
        """All output tokens after the final LayerNorm: ``[B, tokens, width]`` in ``dtype``.

        ``mask [B, patches]`` (bool) with ``mask_token [width]``: the embeddings of the masked
        patches are replaced by the token before the position embeddings are added (iBOT /
        TIPS masked prediction). ``any_size``: images of another size than ``image_size`` (a
        multiple of the patch) read bilinearly resized position embeddings (DINO's local crops).
        """
        self._check(images, any_size)
        x = self.patch_embed(images)
        if mask is not None:
            x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype),
                                   (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self._pos_embed(images.shape[1:3]).astype(x.dtype)
        x = constrain(x, "act_batch", "act_len", "act_embed")
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.encoder(x)
        return self.final_norm(x)

    def _pos_embed(self, hw: tuple[int, int]) -> jax.Array:
        """The position embeddings of an ``hw`` image: the learned ones at ``image_size``,
        otherwise the patch grid's resized bilinearly (the class token's kept)."""
        pos = self.pos_embed[...]
        p = self.patch_size
        if tuple(hw) == tuple(self.image_size):
            return pos
        n_cls = 1 if self.cls_token is not None else 0
        gh, gw = self.image_size[0] // p, self.image_size[1] // p
        grid = pos[n_cls:].reshape(gh, gw, -1)
        grid = jax.image.resize(grid, (hw[0] // p, hw[1] // p, grid.shape[-1]), "bilinear")
        return jnp.concatenate([pos[:n_cls], grid.reshape(-1, grid.shape[-1])], axis=0)

    def pool(self, x: jax.Array) -> jax.Array:
        """Tokens ``[B, tokens, width]`` (:meth:`encode_tokens`) -> the pooled feature
        ``[B, width]`` (or logits), float32."""
        if self.pool_type == "tok":
            x = x[:, 0]
        elif self.pool_type in ("gap", "avg"):
            x = x[:, 1:] if self.pool_type == "avg" else x
            x = jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)
        else:
            x = self.map_head(x)
        if self.head is not None:
            x = self.head(x)
        return x.astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, 3]`` -> pooled ``[B, width]`` (or logits ``[B, num_classes]``),
        float32."""
        return self.pool(self.encode_tokens(images))


def vit_flops(variant: str | None = None, *, image_size: int | tuple[int, int] = 224,
              pool_type: str = "tok", num_classes: int = 0, **overrides: Any) -> float:
    """Analytic forward matmul FLOPs (2 x MACs) of :class:`ViT` on one image."""
    dims = resolve_dims(variant, **{k: overrides.get(k) for k in
                                    ("width", "depth", "mlp_dim", "num_heads", "patch_size")})
    h, w = _pair(image_size)
    p, width, mlp = dims["patch_size"], dims["width"], dims["mlp_dim"]
    n = (h // p) * (w // p)
    t = n + has_cls_token(pool_type)
    flops = 2.0 * n * p * p * 3 * width
    flops += dims["depth"] * layers.attention_flops(t, width, mlp)
    if pool_type == "map":
        flops += layers.attention_flops(1, width, mlp, kv_tokens=t)
    flops += 2.0 * width * num_classes
    return flops


__all__ = ["VARIANTS", "POOL_TYPES", "has_cls_token", "decode_variant", "resolve_dims",
           "PatchEmbed", "ViT", "vit_flops"]
