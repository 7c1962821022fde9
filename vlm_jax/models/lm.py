"""Decoder-only language model: LLaMA-style (RMSNorm, rotary embeddings, SwiGLU, grouped-query
attention) or GPT-2-style (LayerNorm, learned positions, GELU MLP, biases), with a KV cache.

    lm = LanguageModel(style='llama', vocab_size=32000, width=4096, depth=32, num_heads=32,
                       num_kv_heads=8, mlp_dim=11008, max_length=4096, rngs=nnx.Rngs(0))
    logits = lm(tokens)                                   # [B, L, vocab], causal
    tokens = decoding.generate(lm, prompt=prompt, prompt_valid=valid, max_new_tokens=20)

The arithmetic follows Hugging Face ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` so their weights
import unchanged (:func:`vlm_jax.convert.convert_hf_lm`): rotary embeddings in the
``rotate_half`` convention (the first and second halves of each head's features form the
complex pairs), RMSNorm in float32 with the gain applied after the cast back
(``weight * x.to(dtype)``), GPT-2's tanh-approximated GELU.

**Positions and padding.** A forward takes an optional ``valid [B, L]`` mask: invalid tokens
(padding) are never attended to, and the position of each token is the number of valid tokens
before it. Prompts of different lengths are therefore left-padded for generation (as Hugging Face
does), and the positions of the real tokens do not depend on the padding.

**KV cache.** :meth:`LanguageModel.init_cache` makes per-layer ``k``/``v`` arrays
``[B, Lmax, kv_heads, head_dim]`` plus ``valid`` and the next position of each row;
:meth:`LanguageModel.step` runs ``T`` new tokens (a prompt, then one token at a time) against the
cache. The full forward and the cached steps compute the same logits (test_models.py). With
:meth:`full_logits` (the full forward), :attr:`stop_ids` and :meth:`reorder_cache` these are the
decoding protocol of :mod:`vlm_jax.decoding` (greedy, beam search, sampling).

The pieces are exposed (:meth:`embed`, :meth:`layers` with its ``before`` hooks, :meth:`logits`)
so that Flamingo can insert its gated cross-attention blocks between the frozen layers. The
layers are :func:`vlm_jax.models.layers.stack_layers` (``scan_layers``: stacked, run under
``nnx.scan``; ``remat`` per layer) and the attention is
:class:`vlm_jax.models.layers.MultiHeadAttention`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.parallel import constrain

STYLES = ("llama", "gpt2")
_X = ("act_batch", "act_len", "act_embed")


class RMSNorm(nnx.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, statistics in float32 (HF ``LlamaRMSNorm``)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: layers.Dtype = "float32",
                 rngs: nnx.Rngs):
        self.eps, self.dtype = eps, layers.as_dtype(dtype)
        self.scale = layers.param(rngs, nnx.initializers.ones, (dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


rotary = layers.rotary  # Re-exported: it lives with the attention module.


class MLP(nnx.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))`` (llama) or ``fc2(gelu_tanh(fc1(x)))`` (gpt2)."""

    def __init__(self, width: int, mlp_dim: int, *, style: str, use_bias: bool,
                 dtype: layers.Dtype, rngs: nnx.Rngs):
        self.style = style
        kw = dict(use_bias=use_bias, kernel_init=nnx.initializers.normal(0.02), dtype=dtype,
                  rngs=rngs)
        if style == "llama":
            self.gate = layers.Dense(width, mlp_dim, ("embed", "mlp"), **kw)
        self.up = layers.Dense(width, mlp_dim, ("embed", "mlp"), **kw)
        self.down = layers.Dense(mlp_dim, width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.style == "llama":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = jax.nn.gelu(self.up(x), approximate=True)
        return self.down(constrain(h, "act_batch", "act_len", "act_mlp"))


class Block(nnx.Module):
    """Pre-norm decoder layer: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: "LMConfig", *, rngs: nnx.Rngs):
        llama = cfg.style == "llama"
        dt = cfg.dtype

        def norm():
            if llama:
                return RMSNorm(cfg.width, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
            return layers.LayerNorm(cfg.width, eps=cfg.norm_eps, dtype=dt, rngs=rngs)

        self.norm1 = norm()
        self.attn = layers.MultiHeadAttention(
            cfg.width, cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            qkv_bias=not llama, out_bias=not llama,
            rope_theta=cfg.rope_theta if llama else None,
            kernel_init=nnx.initializers.normal(0.02), dtype=dt, rngs=rngs)
        self.norm2 = norm()
        self.mlp = MLP(cfg.width, cfg.mlp_dim, style=cfg.style, use_bias=not llama, dtype=dt,
                       rngs=rngs)

    def __call__(self, x, positions, mask, cache=None, index=None):
        """``x [B, T, D]`` at ``positions [B, T]``, ``mask [B, 1, T, S]``; with a ``cache``
        (``{'k', 'v'}`` of this layer) the new keys/values go to slot ``index``. Returns
        ``(x, updated cache or None)``."""
        h = self.attn(self.norm1(x), mask=mask, positions=positions, cache=cache,
                      cache_index=index)
        h, new = (h, None) if cache is None else h
        x = constrain(x + h, *_X)
        return constrain(x + self.mlp(self.norm2(x)), *_X), new


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of :class:`LanguageModel` (see there)."""
    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    max_length: int
    style: str = "llama"
    num_kv_heads: int = 0  # 0: num_heads (no grouping)
    head_dim: int = 0  # 0: width // num_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int = 0
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r}; use one of {STYLES}.")
        object.__setattr__(self, "num_kv_heads", self.num_kv_heads or self.num_heads)
        if not self.head_dim:
            if self.width % self.num_heads:
                raise ValueError(f"width={self.width} is not divisible by "
                                 f"num_heads={self.num_heads}; set head_dim.")
            object.__setattr__(self, "head_dim", self.width // self.num_heads)


class LanguageModel(nnx.Module):
    """Decoder-only transformer LM. Arguments: the fields of :class:`LMConfig`.

    Parameters: ``token_embed.embedding [vocab, embed]``, ``pos_embed [max_length, embed]``
    (gpt2 only), ``blocks.{i}.{norm1,attn.{query,key,value,out},norm2,mlp.{gate,up,down}}``
    (with ``scan_layers`` stacked along a leading ``'layers'`` axis: ``blocks.attn...``),
    ``final_norm``, ``lm_head.kernel [embed, vocab]`` (absent with ``tie_embeddings``: the
    logits are then ``x @ token_embed.embedding.T``, as GPT-2).
    """

    def __init__(self, *, rngs: nnx.Rngs, **kwargs: Any):
        cfg = LMConfig(**kwargs)
        self.cfg = cfg
        self.dtype = layers.as_dtype(cfg.dtype)
        self.token_embed = layers.Embed(cfg.vocab_size, cfg.width, dtype=cfg.dtype, rngs=rngs)
        if cfg.style == "gpt2":
            self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.01),
                                          (cfg.max_length, cfg.width), ("pos", "embed"))
        layers.remat_policy(cfg.remat)  # validate early
        self.blocks = layers.stack_layers(lambda r: Block(cfg, rngs=r), cfg.depth,
                                          scan=cfg.scan_layers, rngs=rngs)
        if cfg.style == "llama":
            self.final_norm = RMSNorm(cfg.width, eps=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
        else:
            self.final_norm = layers.LayerNorm(cfg.width, eps=cfg.norm_eps, dtype=cfg.dtype,
                                               rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = layers.Dense(cfg.width, cfg.vocab_size, ("embed", "vocab"),
                                        use_bias=False,
                                        kernel_init=nnx.initializers.normal(0.02),
                                        dtype=cfg.dtype, rngs=rngs)

    # Identity of the special tokens, for decoding and the data pipeline.
    bos_id = property(lambda self: self.cfg.bos_id)
    eos_id = property(lambda self: self.cfg.eos_id)
    pad_id = property(lambda self: self.cfg.pad_id)
    context_length = property(lambda self: self.cfg.max_length)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a generated row (``eos_id``; none without one)."""
        return () if self.cfg.eos_id is None else (self.cfg.eos_id,)

    # -- pieces (Flamingo inserts its blocks between the layers) --------------------------------

    def embed(self, tokens: jax.Array, positions: jax.Array,
              embeddings: jax.Array | None = None) -> jax.Array:
        """Input features ``[B, L, width]`` of ``tokens`` (or of given ``embeddings``)."""
        x = self.token_embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        if self.cfg.style == "gpt2":
            pos = jnp.clip(positions, 0, self.cfg.max_length - 1)
            x = x + jnp.take(self.pos_embed[...], pos, axis=0).astype(x.dtype)
        return constrain(x, *_X)

    def logits(self, x: jax.Array) -> jax.Array:
        """Next-token logits ``[B, L, vocab]`` (float32) of final-layer features."""
        return self.head(self.final_norm(x))

    def head(self, x: jax.Array) -> jax.Array:
        """The output projection of final-normed features (tied or ``lm_head``), float32."""
        if self.cfg.tie_embeddings:
            w = self.token_embed.embedding[...].astype(self.dtype)
            y = jnp.einsum("bld,vd->blv", x, w, preferred_element_type=jnp.float32)
        else:
            y = self.lm_head(x)
        return constrain(y.astype(jnp.float32), "act_batch", "act_len", "act_vocab")

    # -- full forward ---------------------------------------------------------------------------

    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None, *,
                 embeddings: jax.Array | None = None) -> jax.Array:
        """Causal logits ``[B, L, vocab]`` of ``tokens [B, L]`` (``valid``: see module doc)."""
        x, positions, mask = self.prepare(tokens, valid, embeddings)
        x, _ = self.layers(x, positions, mask)
        return self.logits(x)

    def layers(self, x, positions, mask, cache: Mapping | None = None,
               before: Mapping[int, Any] | None = None) -> tuple[jax.Array, dict | None]:
        """All layers; ``before[i](x)`` runs before layer ``i`` (Flamingo's cross-attention
        blocks). With a ``cache`` (from :meth:`step_inputs`) the layers read and extend it:
        returns ``(x, cache with the new keys / values and the index advanced)``."""
        aux = {"positions": positions, "mask": mask,
               "index": None if cache is None else cache["index"]}
        per = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        x, kv = layers.run_layers(self.blocks, _layer, x, aux, per, scan=self.cfg.scan_layers,
                                  remat=self.cfg.remat, before=before)
        if cache is not None:
            cache = dict(cache, k=kv["k"], v=kv["v"], index=cache["index"] + x.shape[1])
        return x, cache

    def prepare(self, tokens, valid=None, embeddings=None):
        """``(x, positions, mask)`` of a full causal forward."""
        b, length = tokens.shape
        if length > self.cfg.max_length and self.cfg.style == "gpt2":
            raise ValueError(f"Sequence length {length} exceeds max_length "
                             f"{self.cfg.max_length} (learned positions).")
        valid = jnp.ones((b, length), jnp.bool_) if valid is None else valid.astype(jnp.bool_)
        positions = positions_of(valid)
        causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
        mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, L, L]
        return self.embed(tokens, positions, embeddings), positions, mask

    # -- KV-cached decoding -----------------------------------------------------------------------

    def init_cache(self, batch: int, max_length: int) -> dict:
        """An empty cache for ``max_length`` tokens per row (prompt included)."""
        cfg = self.cfg
        shape = (cfg.depth, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
        kv = constrain(jnp.zeros(shape, self.dtype), "layers", *layers.CACHE_AXES)
        return {"k": kv, "v": kv,
                "valid": jnp.zeros((batch, max_length), jnp.bool_),
                "next_pos": jnp.zeros((batch,), jnp.int32),
                "index": jnp.zeros((), jnp.int32)}

    def step_inputs(self, tokens, cache, valid=None, embeddings=None):
        """``(x, positions, mask, cache_with_valid)`` for ``tokens [B, T]`` written at cache slots
        ``cache['index'] + arange(T)``."""
        b, t = tokens.shape
        index = cache["index"]
        valid = jnp.ones((b, t), jnp.bool_) if valid is None else valid.astype(jnp.bool_)
        positions = cache["next_pos"][:, None] + positions_of(valid)
        all_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, index, 1)
        slots = jnp.arange(all_valid.shape[1])
        causal = slots[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S]
        mask = (causal[None] & all_valid[:, None, :])[:, None]
        cache = dict(cache, valid=all_valid,
                     next_pos=cache["next_pos"] + valid.sum(-1).astype(jnp.int32))
        return self.embed(tokens, positions, embeddings), positions, mask, cache

    def step(self, tokens: jax.Array, cache: Mapping, valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict]:
        """Logits ``[B, T, vocab]`` of ``tokens [B, T]`` following the cached ones; returns the
        extended cache."""
        x, positions, mask, cache = self.step_inputs(tokens, cache, valid)
        x, cache = self.layers(x, positions, mask, cache)
        return self.logits(x), cache

    def full_logits(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """The full causal forward (``self(tokens, valid)``): decoding's uncached path."""
        return self(tokens, valid)

    def reorder_cache(self, cache: Mapping, indices: jax.Array) -> dict:
        """The cache with its batch rows gathered by ``indices`` (beam search)."""
        return reorder_cache(cache, indices)

    @classmethod
    def from_config(cls, cfg: Any, *, rngs: nnx.Rngs) -> "LanguageModel":
        from vlm_jax.models.clip import check_keys, to_plain_dict  # pylint: disable=import-outside-toplevel
        cfg = to_plain_dict(cfg)
        cfg.pop("name", None)
        check_keys(cfg, {f.name for f in dataclasses.fields(LMConfig)}, "model")
        return cls(**cfg, rngs=rngs)


def _layer(block: Block, x, aux, cache):
    return block(x, aux["positions"], aux["mask"], cache, aux["index"])


def positions_of(valid: jax.Array) -> jax.Array:
    """Position of each token = number of valid tokens before it (``[B, L]`` int32)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def next_token_loss(logits: jax.Array, tokens: jax.Array, weights: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``, weighted by
    ``weights[:, 1:]`` (0 for padding and for targets that are not predicted). Returns
    ``(loss, number of predicted tokens)``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    w = weights[:, 1:].astype(jnp.float32)
    n = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(n, 1.0), n


def lm_flops(*, vocab_size: int, width: int, depth: int, mlp_dim: int, max_length: int,
             style: str = "llama", num_heads: int = 1, num_kv_heads: int = 0,
             head_dim: int = 0, **unused) -> float:
    """Analytic forward matmul FLOPs (2 x MACs) of one sequence of ``max_length`` tokens:
    projections, attention (no causal discount), MLP (3 matmuls for SwiGLU) and the LM head."""
    del unused
    hd = head_dim or width // num_heads
    kvh = num_kv_heads or num_heads
    per_token = (2 * width * hd * (2 * num_heads + 2 * kvh)  # q, out, k, v
                 + 2 * 2 * max_length * num_heads * hd  # scores + weighted values
                 + 2 * width * mlp_dim * (3 if style == "llama" else 2))
    return float(max_length * (depth * per_token + 2 * width * vocab_size))


def reorder_cache(cache: Mapping, indices: jax.Array) -> dict:
    """An LM (or Flamingo) cache with its batch rows gathered by ``indices [B']``: axis 1 of the
    layer-stacked ``k`` / ``v``, axis 0 of the per-row entries; ``index`` is shared."""
    out = {}
    for name, value in cache.items():
        if name == "index":
            out[name] = value
        else:
            out[name] = jnp.take(value, indices, axis=1 if name in ("k", "v") else 0)
    return out


__all__ = ["LMConfig", "LanguageModel", "RMSNorm", "rotary", "positions_of", "next_token_loss",
           "lm_flops", "reorder_cache", "STYLES"]
