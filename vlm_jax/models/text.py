"""Text transformer encoder (CLIP text tower).

Token embedding + learned position embedding, (causal) pre-LN transformer blocks, final
LayerNorm, and pooling at the end-of-text token, as OpenAI CLIP / open_clip do. (open_clip pools at
``tokens.argmax(-1)``, which is the end-of-text token because it has the largest id; here the
first ``eos_id`` is used explicitly, so any vocabulary works.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.parallel import constrain

TEXT_POOL_TYPES = ("eos", "last", "first")


class TextTransformer(nnx.Module):
    """Text encoder: ``tokens int32 [B, L] -> [B, width]`` (float32).

    Args:
      width, depth, num_heads, mlp_dim: transformer size.
      vocab_size: rows of ``token_embed.embedding [vocab, embed]``.
      context_length: rows of ``pos_embed [context_length, embed]``; longer inputs raise
        ValueError, shorter ones use the first ``L`` positions.
      eos_id: end-of-text token id used for ``pool_type='eos'``: the feature at the first
        occurrence of ``eos_id`` in each row (the last position if a row has none).
      pool_type: ``'eos'`` (CLIP), ``'last'`` or ``'first'`` token.
      causal: causal self-attention mask (True for CLIP).
      act, ln_eps: MLP activation and LayerNorm epsilon (CLIP: quick_gelu or gelu, 1e-5).
      token_init_std / pos_init_std: init stds (0.02 / 0.01 as open_clip).
      dtype, remat, scan_layers: see :class:`~vlm_jax.models.layers.Encoder`.

    Parameters: ``token_embed.embedding``, ``pos_embed``, ``encoder.blocks.{i}...``,
    ``final_norm.{scale,bias}``.
    """

    def __init__(self, *, width: int, depth: int, num_heads: int, mlp_dim: int,
                 vocab_size: int, context_length: int, eos_id: int | None = None,
                 pool_type: str = "eos", causal: bool = True, act: str = "gelu",
                 ln_eps: float = 1e-5, token_init_std: float = 0.02, pos_init_std: float = 0.01,
                 dtype: layers.Dtype = "float32", remat: str = "none",
                 scan_layers: bool = False, rngs: nnx.Rngs):
        if pool_type not in TEXT_POOL_TYPES:
            raise ValueError(f"Unknown text pool_type {pool_type!r}; use one of "
                             f"{TEXT_POOL_TYPES}.")
        if pool_type == "eos" and eos_id is None:
            raise ValueError("pool_type='eos' needs eos_id (the end-of-text token id).")
        self.width, self.depth = width, depth
        self.num_heads, self.mlp_dim = num_heads, mlp_dim
        self.vocab_size, self.context_length = vocab_size, context_length
        self.eos_id = eos_id
        self.pool_type = pool_type
        self.dtype = layers.as_dtype(dtype)
        self.token_embed = layers.Embed(vocab_size, width,
                                        init=nnx.initializers.normal(token_init_std),
                                        dtype=dtype, rngs=rngs)
        self.pos_embed = layers.param(rngs, nnx.initializers.normal(pos_init_std),
                                      (context_length, width), ("pos", "embed"))
        self.encoder = layers.Encoder(depth, width, num_heads, mlp_dim, act=act, causal=causal,
                                      ln_eps=ln_eps, dtype=dtype, remat=remat,
                                      scan_layers=scan_layers, rngs=rngs)
        self.final_norm = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)

    def _check(self, tokens: jax.Array) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"TextTransformer expects tokens [batch, length], got shape "
                             f"{tuple(tokens.shape)}.")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"TextTransformer expects integer token ids, got {tokens.dtype}.")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"Token length {tokens.shape[1]} exceeds context_length "
                             f"{self.context_length}.")

    def encode_tokens(self, tokens: jax.Array) -> jax.Array:
        """Per-token features after the final LayerNorm: ``[B, L, width]`` in ``dtype``."""
        self._check(tokens)
        length = tokens.shape[1]
        x = self.token_embed(tokens)
        x = x + self.pos_embed[...][:length].astype(x.dtype)
        x = constrain(x, "act_batch", "act_len", "act_embed")
        x = self.encoder(x)
        return self.final_norm(x)

    def pool_index(self, tokens: jax.Array) -> jax.Array:
        """Index ``[B]`` of the pooled token of each row."""
        length = tokens.shape[1]
        if self.pool_type == "first":
            return jnp.zeros(tokens.shape[:1], jnp.int32)
        if self.pool_type == "last":
            return jnp.full(tokens.shape[:1], length - 1, jnp.int32)
        is_eos = tokens == self.eos_id
        first = jnp.argmax(is_eos, axis=-1).astype(jnp.int32)
        return jnp.where(jnp.any(is_eos, axis=-1), first, length - 1)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [B, L]`` -> pooled features ``[B, width]`` (float32)."""
        x = self.encode_tokens(tokens)
        idx = self.pool_index(tokens)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return pooled.astype(jnp.float32)


def text_flops(*, width: int, depth: int, mlp_dim: int, context_length: int,
               **unused) -> float:
    """Analytic forward matmul FLOPs (2 x MACs) of :class:`TextTransformer` on one sequence of
    ``context_length`` tokens (full attention counted, no causal discount)."""
    del unused
    return depth * layers.attention_flops(context_length, width, mlp_dim)


__all__ = ["TEXT_POOL_TYPES", "TextTransformer", "text_flops"]
