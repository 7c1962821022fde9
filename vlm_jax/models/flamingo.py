"""Flamingo's vision-to-language bridge (Alayrac et al., 2022): the Perceiver resampler, gated
cross-attention dense blocks and media masking.

These are the parts that Flamingo trains while the vision encoder and the language model stay
frozen. The language model, the interleaved-data pipeline, training and few-shot evaluation are
not here yet.

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

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
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
        for norm_m, norm_l, attn, ffw in zip(self.norm_media, self.norm_latents, self.attn,
                                             self.ffw):
            q = norm_l(lat)
            kv = jnp.concatenate([norm_m(x), q], axis=1)
            lat = constrain(lat + attn(q, kv), *_X)
            lat = constrain(lat + ffw(lat), *_X)
        return self.final_norm(lat).reshape(b, t, self.num_latents, d)


def media_attention_mask(media_locations: jax.Array, num_media: int,
                         tokens_per_medium: int) -> jax.Array:
    """Boolean ``[B, 1, L, T * tokens_per_medium]``: text position ``i`` may attend to the
    visual tokens of medium ``j`` iff ``j`` is the last medium whose ``<image>`` token is at or
    before ``i``.

    ``media_locations``: bool ``[B, L]``, True at each ``<image>`` token (the k-th True is
    medium k). Rows before the first image are all False.
    """
    index = jnp.cumsum(media_locations.astype(jnp.int32), axis=-1)  # [B, L], 0 = no image yet
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
        self.attn = layers.MultiHeadAttention(dim, num_heads, head_dim=head_dim, qkv_bias=False,
                                              out_bias=False, dtype=dtype, rngs=rngs)
        if media_dim != dim:  # keys / values read media_dim features
            hd = (num_heads, head_dim or dim // num_heads)
            self.attn.key = layers.Dense(media_dim, hd, ("embed", "heads", "kv"),
                                         use_bias=False, dtype=dtype, rngs=rngs)
            self.attn.value = layers.Dense(media_dim, hd, ("embed", "heads", "kv"),
                                           use_bias=False, dtype=dtype, rngs=rngs)
        self.attn_gate = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=())
        self.ffw = FeedForward(dim, ff_mult, dtype=dtype, rngs=rngs)
        self.ff_gate = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=())

    def __call__(self, x: jax.Array, media: jax.Array, media_locations: jax.Array) -> jax.Array:
        """``x [B, L, D]`` text states, ``media [B, T, M, Dm]`` (resampled tokens per medium),
        ``media_locations`` bool ``[B, L]`` (True at ``<image>`` tokens)."""
        b, t, m, dm = media.shape
        mask = media_attention_mask(media_locations, t, m)
        y = self.attn(self.norm(x), media.reshape(b, t * m, dm), mask=mask)
        # A row with no visible medium (before the first image) gets no update: the softmax over
        # an all-masked row would otherwise average every visual token.
        y = jnp.where(jnp.any(mask, axis=-1)[:, 0, :, None], y, 0)
        x = x + jnp.tanh(self.attn_gate[...]).astype(y.dtype) * y
        x = constrain(x, *_X)
        x = x + jnp.tanh(self.ff_gate[...]).astype(x.dtype) * self.ffw(x)
        return constrain(x, *_X)
