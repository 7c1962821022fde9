"""Flamingo's vision-to-language bridge (Alayrac et al., 2022): the Perceiver resampler, gated
cross-attention dense blocks and media masking.

These are the parts that Flamingo trains while the vision encoder and the language model stay
frozen; :class:`Flamingo` assembles them with a ViT (from a CLIP checkpoint) and a
:class:`~vlm_jax.models.lm.LanguageModel` (pretrained, or imported from Hugging Face).

* :class:`PerceiverResampler` maps the visual features of each image or video frame
  ``[B, T, F, D]`` (T media, F frames, D features per token) to a fixed ``num_latents`` tokens per
  medium. The keys and values of each layer are the concatenation of the visual features and
  the latents (paper, Section 2.1 and Appendix A.1.1); learned time embeddings are added to the
  features of each frame. Depth 6 and 64 latents by default, as the paper.
* :class:`GatedCrossAttentionBlock`: ``x + tanh(a) * xattn(norm(x), media)`` then
  ``x + tanh(b) * ffw(norm(x))`` with ``a = b = 0`` at initialisation, so an LM with these blocks
  inserted computes exactly the frozen LM until the gates move.
* :func:`media_attention_mask`: each text token attends only to the visual tokens of the most
  recent image before it; tokens before the first image attend to none (their cross-attention
  output is zero, not an average over nothing).

Parameters follow the project's conventions: created with logical axis names (``embed``,
``heads``, ``kv``, ``mlp``); bias-free projections and feed-forwards as the paper's
pseudo-code and open_flamingo.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.models.lm import LanguageModel, LMConfig, lm_flops, reorder_cache
from vlm_jax.models.vit import ViT, vit_flops
from vlm_jax.parallel import constrain

_X = ("act_batch", "act_len", "act_embed")


class FeedForward(nnx.Module):
    """``LayerNorm -> Dense(dim, mult * dim) -> GELU -> Dense(mult * dim, dim)``, no biases."""

    def __init__(self, dim: int, mult: int = 4, *, dtype: layers.Dtype = "float32",
                 rngs: nnx.Rngs):
        self.norm = layers.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.fc1 = layers.Dense(dim, mult * dim, ("embed", "mlp"), use_bias=False, dtype=dtype,
                                rngs=rngs)
        self.fc2 = layers.Dense(mult * dim, dim, ("mlp", "embed"), use_bias=False, dtype=dtype,
                                rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.fc1(self.norm(x)), "act_batch", "act_len", "act_mlp")
        return self.fc2(jax.nn.gelu(h, approximate=False))


class PerceiverResampler(nnx.Module):
    """Visual features ``[B, T, F, N, D]`` (T media, F frames of N tokens) -> ``[B, T, L, D]``
    with ``L = num_latents`` learned latent queries per medium.

    Each layer: ``latents += attn(q=norm(latents), kv=[norm(features); norm(latents)])`` then
    ``latents += ffw(latents)``; a final LayerNorm. Features of frame f get the learned time
    embedding ``time[f]`` (``max_frames`` of them); images are one frame.
    """

    def __init__(self, dim: int, *, depth: int = 6, num_latents: int = 64, num_heads: int = 8,
                 head_dim: int | None = None, max_frames: int = 8, ff_mult: int = 4,
                 dtype: layers.Dtype = "float32", rngs: nnx.Rngs):
        self.dim, self.num_latents, self.max_frames = dim, num_latents, max_frames
        self.latents = layers.param(rngs, nnx.initializers.normal(1.0), (num_latents, dim),
                                    (None, "embed"))
        self.time = layers.param(rngs, nnx.initializers.zeros, (max_frames, dim),
                                 (None, "embed"))
        self.norm_media = nnx.List([layers.LayerNorm(dim, dtype=dtype, rngs=rngs)
                                    for _ in range(depth)])
        self.norm_latents = nnx.List([layers.LayerNorm(dim, dtype=dtype, rngs=rngs)
                                      for _ in range(depth)])
        self.attn = nnx.List([layers.MultiHeadAttention(
            dim, num_heads, head_dim=head_dim, qkv_bias=False, out_bias=False, dtype=dtype,
            rngs=rngs) for _ in range(depth)])
        self.ffw = nnx.List([FeedForward(dim, ff_mult, dtype=dtype, rngs=rngs)
                             for _ in range(depth)])
        self.final_norm = layers.LayerNorm(dim, dtype=dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        if features.ndim == 4:  # [B, T, N, D]: single-frame media
            features = features[:, :, None]
        b, t, f, n, d = features.shape
        if d != self.dim or f > self.max_frames:
            raise ValueError(f"PerceiverResampler(dim={self.dim}, max_frames={self.max_frames}) "
                             f"got features of shape {tuple(features.shape)} "
                             "[batch, media, frames, tokens, dim].")
        x = features + self.time[...][:f][None, None, :, None].astype(features.dtype)
        x = x.reshape(b * t, f * n, d)
        lat = jnp.broadcast_to(self.latents[...].astype(x.dtype), (b * t, self.num_latents, d))
        # The layers' parameters are per-kind lists (``norm_media.{i}``, ``attn.{i}`` ...), the
        # layout of saved Flamingo checkpoints; the shared layer loop runs their zip unscanned.
        per_layer = list(zip(self.norm_media, self.norm_latents, self.attn, self.ffw))
        lat, _ = layers.run_layers(per_layer, _resampler_layer, lat, x, scan=False)
        return self.final_norm(lat).reshape(b, t, self.num_latents, d)


def _resampler_layer(layer, lat, x, per):
    """One Perceiver layer: ``lat += attn(norm_l(lat), [norm_m(x); norm_l(lat)])``, ``lat +=
    ffw(lat)``."""
    del per
    norm_m, norm_l, attn, ffw = layer
    q = norm_l(lat)
    kv = jnp.concatenate([norm_m(x), q], axis=1)
    lat = constrain(lat + attn(q, kv), *_X)
    return constrain(lat + ffw(lat), *_X), None


def media_attention_mask(media_locations: jax.Array, num_media: int,
                         tokens_per_medium: int, offset: jax.Array | None = None) -> jax.Array:
    """Boolean ``[B, 1, L, T * tokens_per_medium]``: text position ``i`` may attend to the
    visual tokens of medium ``j`` iff ``j`` is the last medium whose ``<image>`` token is at or
    before ``i``.

    ``media_locations``: bool ``[B, L]``, True at each ``<image>`` token (the k-th True is
    medium k). Rows before the first image are all False. ``offset [B]``: images before these
    tokens (KV-cached decoding continues a sequence).
    """
    index = jnp.cumsum(media_locations.astype(jnp.int32), axis=-1)  # [B, L], 0 = no image yet
    if offset is not None:
        index = index + offset[:, None]
    media = jnp.arange(1, num_media + 1)  # [T]
    allowed = index[:, :, None] == media[None, None, :]  # [B, L, T]
    allowed = jnp.repeat(allowed, tokens_per_medium, axis=-1)
    return allowed[:, None]


class GatedCrossAttentionBlock(nnx.Module):
    """Flamingo's GATED XATTN-DENSE: ``x += tanh(attn_gate) * xattn(norm(x), media)``, then
    ``x += tanh(ff_gate) * ffw(x)``; both gates start at 0 (the block is the identity)."""

    def __init__(self, dim: int, media_dim: int | None = None, *, num_heads: int = 8,
                 head_dim: int | None = None, ff_mult: int = 4,
                 dtype: layers.Dtype = "float32", rngs: nnx.Rngs):
        media_dim = media_dim or dim
        self.norm = layers.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.attn = layers.MultiHeadAttention(dim, num_heads, head_dim=head_dim,
                                              kv_width=media_dim, qkv_bias=False,
                                              out_bias=False, dtype=dtype, rngs=rngs)
        self.attn_gate = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=())
        self.ffw = FeedForward(dim, ff_mult, dtype=dtype, rngs=rngs)
        self.ff_gate = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=())

    def __call__(self, x: jax.Array, media: jax.Array, media_locations: jax.Array,
                 offset: jax.Array | None = None) -> jax.Array:
        """``x [B, L, D]`` text states, ``media [B, T, M, Dm]`` (resampled tokens per medium),
        ``media_locations`` bool ``[B, L]`` (True at ``<image>`` tokens), ``offset [B]``
        images before ``x`` (see :func:`media_attention_mask`)."""
        b, t, m, dm = media.shape
        mask = media_attention_mask(media_locations, t, m, offset)
        y = self.attn(self.norm(x), media.reshape(b, t * m, dm), mask=mask)
        # A row with no visible medium (before the first image) gets no update: the softmax over
        # an all-masked row would otherwise average every visual token.
        y = jnp.where(jnp.any(mask, axis=-1)[:, 0, :, None], y, 0)
        x = x + jnp.tanh(self.attn_gate[...]).astype(y.dtype) * y
        x = constrain(x, *_X)
        x = x + jnp.tanh(self.ff_gate[...]).astype(x.dtype) * self.ffw(x)
        return constrain(x, *_X)


# -------------------------------------------------------------------------------------------
# The assembled model.
# -------------------------------------------------------------------------------------------

_TOP_KEYS = {"name", "vision", "lm", "resampler", "cross_attn", "cross_attn_every", "dtype",
             "remat"}
RESAMPLER_KEYS = {"depth", "num_latents", "num_heads", "head_dim", "max_frames", "ff_mult"}
CROSS_ATTN_KEYS = {"num_heads", "head_dim", "ff_mult"}
NUM_NEW_TOKENS = 2  # <image>, <|endofchunk|>
IMAGES_PER_DOCUMENT = 5  # for the FLOPs estimate: training documents have up to 5 images


class Flamingo(nnx.Module):
    """Flamingo (Alayrac et al., 2022): a frozen vision encoder and a frozen language model
    bridged by a trained Perceiver resampler and gated cross-attention dense blocks.

    Args:
      vision: :class:`~vlm_jax.models.vit.ViT` arguments: the ``image`` tower of a CLIP config,
        so that a CLIP checkpoint's ``image`` parameters load as ``vision`` (``init_from``).
        All its output tokens (class token included) are the visual features.
      lm: :class:`~vlm_jax.models.lm.LMConfig` fields of the language model.
      resampler: :class:`PerceiverResampler` arguments (``depth`` 6, ``num_latents`` 64 as the
        paper by default).
      cross_attn: ``num_heads``, ``head_dim``, ``ff_mult`` of the gated cross-attention blocks.
      cross_attn_every: a block before every N-th LM layer (before layers ``N-1, 2N-1, ...``
        as open_flamingo's ``cross_attn_every_n_layers``; 1 = before every layer). With
        ``lm.scan_layers`` the LM's stacked layers run as one ``nnx.scan`` per group between
        two cross-attention blocks (:func:`~vlm_jax.models.layers.run_layers` with ``before``
        hooks), so the LM checkpoint keeps its ``[depth, ...]`` stacking.

    Vocabulary: the LM's ``vocab_size`` ids, then ``<image>`` (``image_id = vocab_size``) and
    ``<|endofchunk|>`` (``eoc_id = vocab_size + 1``), whose input embeddings
    (``extra_embed [2, width]``) and output rows (``extra_head [width, 2]``, zeros at
    initialisation) are new parameters. Logits have ``vocab_size + 2`` columns; their first
    ``vocab_size`` are the frozen LM's exactly while the gates are 0.

    Parameters: ``vision``, ``lm``, ``resampler``, ``xattn.{j}``, ``extra_embed``,
    ``extra_head``. What trains is chosen by ``config.optim.trainable`` (the Flamingo configs:
    ``resampler``, ``xattn`` and the extras).
    """

    def __init__(self, *, vision: Mapping, lm: Mapping, resampler: Mapping | None = None,
                 cross_attn: Mapping | None = None, cross_attn_every: int = 4,
                 dtype: layers.Dtype = "float32", remat: str = "none", rngs: nnx.Rngs):
        from vlm_jax.models.clip import check_keys, image_kwargs  # pylint: disable=import-outside-toplevel

        lm = dict(lm)
        resampler, cross_attn = dict(resampler or {}), dict(cross_attn or {})
        # CLIP's image-tower defaults, so that a CLIP checkpoint's `image` loads as `vision`.
        vision = image_kwargs(vision, {"dtype": dtype, "remat": "none", "scan_layers": False},
                              where="model.vision")
        check_keys(lm, {f.name for f in dataclasses.fields(LMConfig)}, "model.lm")
        check_keys(resampler, RESAMPLER_KEYS, "model.resampler")
        check_keys(cross_attn, CROSS_ATTN_KEYS, "model.cross_attn")
        if cross_attn_every < 1:
            raise ValueError(f"model.cross_attn_every={cross_attn_every} must be >= 1.")
        lm.setdefault("dtype", dtype)
        lm.setdefault("remat", remat)
        self.vision = ViT(**vision, rngs=rngs)
        self.lm = LanguageModel(**lm, rngs=rngs)
        cfg = self.lm.cfg
        dv = self.vision.width
        self.vocab_size = cfg.vocab_size
        self.image_id, self.eoc_id = cfg.vocab_size, cfg.vocab_size + 1
        self.cross_attn_every = cross_attn_every
        self.resampler = PerceiverResampler(dv, dtype=dtype, rngs=rngs, **resampler)
        self.xattn_layers = tuple(i for i in range(cfg.depth)
                                  if (i + 1) % cross_attn_every == 0)
        if not self.xattn_layers:
            raise ValueError(f"model.cross_attn_every={cross_attn_every} exceeds the LM depth "
                             f"{cfg.depth}: no cross-attention block would be inserted.")
        cross_attn.setdefault("num_heads", cfg.num_heads)
        self.xattn = nnx.List([GatedCrossAttentionBlock(cfg.width, dv, dtype=dtype, rngs=rngs,
                                                        **cross_attn)
                               for _ in self.xattn_layers])
        self.extra_embed = layers.param(rngs, nnx.initializers.normal(0.02),
                                        (NUM_NEW_TOKENS, cfg.width), (None, "embed"))
        self.extra_head = layers.param(rngs, nnx.initializers.zeros,
                                       (cfg.width, NUM_NEW_TOKENS), ("embed", None))

    @classmethod
    def from_config(cls, cfg: Any, *, rngs: nnx.Rngs) -> "Flamingo":
        from vlm_jax.models.clip import check_keys, to_plain_dict  # pylint: disable=import-outside-toplevel

        cfg = to_plain_dict(cfg)
        check_keys(cfg, _TOP_KEYS, "model")
        cfg.pop("name", None)
        return cls(**cfg, rngs=rngs)

    bos_id = property(lambda self: self.lm.bos_id)
    eos_id = property(lambda self: self.lm.eos_id)
    pad_id = property(lambda self: self.lm.pad_id)

    def encode_media(self, images: jax.Array) -> jax.Array:
        """``images [B, T, S, S, 3]`` -> resampled visual tokens ``[B, T, num_latents, Dv]``.
        The (frozen) vision encoder's features carry no gradient."""
        b, t = images.shape[:2]
        feats = self.vision.encode_tokens(images.reshape(b * t, *images.shape[2:]))
        feats = jax.lax.stop_gradient(feats)
        return self.resampler(feats.reshape(b, t, *feats.shape[1:]))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings of ``tokens``: the LM's table, or ``extra_embed`` for the new ids."""
        new = tokens >= self.vocab_size
        base = self.lm.token_embed(jnp.where(new, 0, tokens))
        extra = jnp.take(self.extra_embed[...],
                         jnp.clip(tokens - self.vocab_size, 0, NUM_NEW_TOKENS - 1), axis=0)
        return jnp.where(new[..., None], extra.astype(base.dtype), base)

    def logits(self, x: jax.Array) -> jax.Array:
        """``[B, L, vocab_size + 2]`` float32: the LM's head, then the two new tokens."""
        h = self.lm.final_norm(x)
        extra = jnp.einsum("bld,dn->bln", h, self.extra_head[...].astype(h.dtype),
                           preferred_element_type=jnp.float32)
        return jnp.concatenate([self.lm.head(h), extra], axis=-1)

    def _cross_attention(self, media, locations, offset=None) -> dict:
        """``{layer: x -> block(x)}``: the cross-attention blocks, as LM ``before`` hooks."""
        return {i: functools.partial(block, media=media, media_locations=locations,
                                     offset=offset)
                for i, block in zip(self.xattn_layers, self.xattn)}

    def __call__(self, images: jax.Array, tokens: jax.Array,
                 valid: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, L, vocab_size + 2]`` of interleaved ``tokens [B, L]`` whose k-th
        ``<image>`` token shows ``images[:, k]`` (``images [B, T, S, S, 3]``)."""
        return self.full_logits(tokens, valid, self.encode_media(images))

    # -- the decoding protocol (vlm_jax.decoding) -------------------------------------------------

    context_length = property(lambda self: self.lm.cfg.max_length)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """A generated chunk ends at ``<|endofchunk|>`` or the LM's ``eos``."""
        return (self.eoc_id,) + self.lm.stop_ids

    def encode_context(self, images: jax.Array) -> jax.Array:
        """The decoding context: the resampled media (:meth:`encode_media`)."""
        return self.encode_media(images)

    def full_logits(self, tokens: jax.Array, valid: jax.Array | None = None,
                    media: jax.Array | None = None) -> jax.Array:
        """Logits of ``tokens [B, L]`` given resampled ``media [B, T, M, D]`` (full forward)."""
        if media is None:
            raise ValueError("Flamingo.full_logits needs the media (encode_media(images)).")
        embeddings = self.embed_tokens(tokens)
        x, positions, mask = self.lm.prepare(tokens, valid, embeddings)
        x, _ = self.lm.layers(x, positions, mask,
                              before=self._cross_attention(media, tokens == self.image_id))
        return self.logits(x)

    def init_cache(self, batch: int, max_length: int, media: jax.Array) -> dict:
        """The LM's KV cache plus ``media`` (from :meth:`encode_media`, read by every step) and
        ``media_count [B]`` (images seen so far)."""
        if media.shape[0] != batch:
            raise ValueError(f"media of batch {media.shape[0]} for a cache of batch {batch}.")
        cache = self.lm.init_cache(batch, max_length)
        cache["media"] = media
        cache["media_count"] = jnp.zeros((batch,), jnp.int32)
        return cache

    def step(self, tokens: jax.Array, cache: dict, valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict]:
        """Logits of ``tokens [B, T]`` following the cached ones; returns the extended cache.
        A left-padded prompt goes in as one step with its ``valid`` mask, then one token per
        step."""
        embeddings = self.embed_tokens(tokens)
        x, positions, mask, cache = self.lm.step_inputs(tokens, cache, valid, embeddings)
        locations = tokens == self.image_id
        if valid is not None:
            locations = locations & valid.astype(jnp.bool_)
        before = self._cross_attention(cache["media"], locations, cache["media_count"])
        x, cache = self.lm.layers(x, positions, mask, cache, before=before)
        cache["media_count"] = cache["media_count"] + locations.sum(-1).astype(jnp.int32)
        return self.logits(x), cache

    def reorder_cache(self, cache: Mapping, indices: jax.Array) -> dict:
        """The cache with its batch rows (media included) gathered by ``indices``."""
        return reorder_cache(cache, indices)


def flamingo_flops(cfg: Any, batch_size: int | None = None) -> float:
    """Analytic forward matmul FLOPs of one document: the LM over ``lm.max_length`` tokens, the
    cross-attention blocks and resampler, and a third of the vision encoder per image (it runs
    forward only: ``3 x`` this is then the training FLOPs), for 5 images per document."""
    from vlm_jax.models.clip import to_plain_dict  # pylint: disable=import-outside-toplevel

    del batch_size
    cfg = to_plain_dict(cfg)
    lm_cfg, vision = dict(cfg["lm"]), dict(cfg["vision"])
    keys = ("variant", "image_size", "width", "depth", "mlp_dim", "num_heads", "patch_size")
    v = vit_flops(**{k: vision[k] for k in keys if k in vision})
    resampler = dict(cfg.get("resampler") or {})
    n_img = IMAGES_PER_DOCUMENT
    w = lm_cfg["width"]
    length = lm_cfg["max_length"]
    n_x = lm_cfg["depth"] // cfg.get("cross_attn_every", 4)
    lat = resampler.get("num_latents", 64)
    xattn = n_x * length * (2 * w * w * 2 + 2 * 2 * lat * n_img * w + 2 * w * 4 * w * 2)
    return float(lm_flops(**lm_cfg) + xattn + n_img * v / 3)
