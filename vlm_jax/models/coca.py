"""CoCa: contrastive captioner (open_clip ``CoCa`` semantics and parameter structure).

Architecture, as open_clip 3.3 ``coca_model.CoCa`` (``coca_ViT-B-32`` / ``coca_ViT-L-14``):

* **Image tower** (:class:`CoCaVision`): the CLIP ViT trunk (patch embedding without bias, class
  token, position embeddings, ``pre_norm`` = ``ln_pre``, pre-LN blocks) *without* a LayerNorm on
  its output tokens. An :class:`AttentionalPooler` (``n_queries`` learned queries of width
  ``embed_dim``; LayerNorms on the queries and on the image tokens; keys/values projected from the
  ViT width) pools all tokens (class token included), then ``final_norm`` (open_clip ``ln_post``,
  width ``embed_dim``) normalises the ``n_queries`` outputs. Query 0 is the contrastive image
  feature (then ``image_projection``, open_clip ``visual.proj``); queries ``1..n_queries-1`` are
  the captioning context, so :meth:`CoCa.image_context` returns ``n_queries - 1`` tokens
  (255 for the released weights). This is open_clip's ``attentional_pool=True`` setup
  (``pooler.mode='single'``), which open_clip itself notes "does not match the paper".
  ``pooler.mode='parallel'|'cascade'`` builds open_clip's string ``attentional_pool`` variants
  (the paper's design): ``final_norm`` on the ViT tokens, a captioning pooler with ``n_queries``
  outputs (all of them are the context) and a separate 1-query contrastive pooler reading the ViT
  tokens (``parallel``) or the captioning pooler's output (``cascade``).
* **Text tower** (:class:`CoCaText`, open_clip ``TextTransformer(embed_cls=True)``): token +
  position embeddings (``context_length + 1`` rows), a learned ``cls_token`` *appended* after the
  ``L`` text tokens, causal pre-LN blocks whose attention also masks padding keys, and
  ``final_norm`` (``ln_final``) applied to the CLS output only; ``text_projection`` gives the
  contrastive text feature. The decoder reads the *un-normalised* outputs of the ``L`` text
  positions (open_clip's ``token_embs``).
* **Padding mask of the text tower**: by default (``correct_cls_mask=False``) the key-validity
  vector is open_clip's legacy one, with which every released CoCa checkpoint was trained: the
  CLS slot's ``True`` is *prepended*, so key ``0`` is always attended and key ``j >= 1`` is
  attended iff ``tokens[j - 1] != pad_id`` (so the CLS key is masked when the last text token
  is padding). ``correct_cls_mask=True`` gives open_clip's corrected mask (key ``j < L`` iff
  ``tokens[j] != pad_id``, the CLS key always). Either way the mask is causal in the tokens, so
  the token features at positions ``<= t`` depend only on ``tokens[:, :t+1]``.
* **Multimodal decoder** (:class:`MultimodalDecoder`, open_clip ``MultimodalTransformer``): per
  layer a causal self-attention block (``ln_1``, attention, ``ln_2``, MLP; causal mask only, no
  padding mask) followed by a cross-attention block (``ln_1`` on the text, ``ln_1_kv`` on the
  image context, attention, ``ln_2``, its own MLP); then ``final_norm`` (``ln_final``) and the
  bias-free ``vocab_projection`` (open_clip ``text_decoder.text_projection [width, vocab]``).
* ``logit_scale`` (and optional ``logit_bias``) as :class:`~vlm_jax.models.clip.CLIP`.

Deviations from open_clip, and why:

* ``caption_logits`` cover all ``L`` positions (position ``t`` predicts token ``t + 1``); open_clip
  drops the last text token before the decoder and returns ``L - 1`` positions. Everything is
  causal, so the first ``L - 1`` positions are the same numbers; the labels are
  ``tokens[:, 1:]`` in both (:func:`captioning_loss` drops the last position).
* The temperature parameter is clamped to ``[0, logit_scale_max]`` by the training loop after each
  update, as open_clip does (not in the forward pass).
* ``parallel`` / ``cascade`` poolers: open_clip's ``ln_post`` there has width ``embed_dim`` but is
  applied to the ViT tokens, which only works when the ViT width equals ``embed_dim``; here it
  has the ViT width (the same parameters whenever open_clip's version runs). The contrastive
  pooler reads ``embed_dim``-wide tokens in ``cascade`` mode (open_clip: the ViT width; equal
  whenever that version runs). open_clip calls these modes untested; no released weights use
  them.
* The cross-attention keys/values may have a width (``embed_dim``) different from the decoder
  width (torch's ``kdim``/``vdim``); open_clip requires them equal (true for all its configs).
* Parameter initialisation follows vlm_jax (Glorot-uniform kernels), not open_clip's normal
  inits; pooler queries are N(0, 1), CLS N(0, 0.01) and the projections N(0, width^-0.5) as in
  open_clip. Weights imported from open_clip make this irrelevant.
* No dropout, patch dropout, layer scale or HF text towers (not used by the CoCa configs).

Config (dict or ConfigDict; see :data:`COCA_PRESETS` for the open_clip models)::

    model = dict(
      name='coca', embed_dim=512,
      image=dict(variant='B/32', image_size=224),          # any CoCaVision / ViT argument
      text=dict(width=512, depth=12, num_heads=8, mlp_dim=2048, vocab_size=49408,
                context_length=76, bos_id=49406, eos_id=49407, pad_id=0, act='gelu'),
      decoder=dict(depth=12, num_heads=8, mlp_dim=2048),   # defaults: the text tower's
      pooler=dict(n_queries=256, num_heads=8, mode='single'),
      logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0),
      dtype='float32', remat='none', scan_layers=False)

KV-cached decoding: :meth:`CoCa.init_cache` + :meth:`CoCa.decode_logits`, and the decoding
protocol of :mod:`vlm_jax.decoding` (``encode_context``, ``init_cache``, ``step``,
``full_logits``, ``reorder_cache``, ``stop_ids``) on which its greedy / beam / sampling loops
run.

open_clip state-dict key -> parameter path (one to one; ``tests/test_coca.py`` converts a
random open_clip CoCa this way and matches its outputs). Attention: torch ``in_proj_weight``
(or ``q|k|v_proj_weight`` when ``kdim != embed_dim``, as in the image pooler) rows ``q | k | v``,
transposed to ``query|key|value.kernel [in, heads, head_dim]``, ``in_proj_bias`` split to
``.bias [heads, head_dim]``, ``out_proj.weight.T`` -> ``out.kernel [heads, head_dim, out]``;
``ln_*.weight|bias`` -> ``*.scale|bias``; ``mlp.c_fc|c_proj.weight.T`` -> ``mlp.fc1|fc2.kernel``::

    visual.conv1.weight (transpose 2,3,1,0)    image.patch_embed.kernel
    visual.class_embedding                     image.cls_token
    visual.positional_embedding                image.pos_embed
    visual.ln_pre                              image.pre_norm
    visual.transformer.resblocks.N.{ln_1,attn,ln_2,mlp}
                                               image.encoder.blocks.N.{norm1,attn,norm2,mlp}
    visual.attn_pool.{query,attn,ln_q,ln_k}    image.pooler.{query,attn,norm_q,norm_kv}
    visual.ln_post                             image.final_norm
    visual.proj                                image_projection.kernel
    text.token_embedding.weight                text.token_embed.embedding
    text.cls_emb                               text.cls_token
    text.positional_embedding                  text.pos_embed
    text.transformer.resblocks.N               text.encoder.blocks.N
    text.ln_final                              text.final_norm
    text.text_projection                       text_projection.kernel
    text_decoder.resblocks.N                   decoder.blocks.N.self_block
    text_decoder.cross_attn.N.{ln_1,ln_1_kv,attn,ln_2,mlp}
                                               decoder.blocks.N.cross_block.{norm1,norm1_kv,
                                               attn,norm2,mlp}
    text_decoder.ln_final                      decoder.final_norm
    text_decoder.text_projection               decoder.vocab_projection.kernel
    logit_scale                                logit_scale

With ``scan_layers=True`` the ``blocks.N`` of a stack are stacked along a leading axis
(``image.encoder.blocks``, ``text.encoder.blocks``, ``decoder.blocks``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.models.clip import (accepted_keys, check_keys, from_config_dict, to_plain_dict,
                                 tower_kwargs)
from vlm_jax.models.vit import PatchEmbed, _pair, resolve_dims, set_geometry
from vlm_jax.parallel import constrain

POOLER_MODES = ("single", "parallel", "cascade")

_X = ("act_batch", "act_len", "act_embed")


# -------------------------------------------------------------------------------------------
# Image tower.
# -------------------------------------------------------------------------------------------


class AttentionalPooler(nnx.Module):
    """open_clip ``AttentionalPooler``: ``attn(norm_q(query), norm_kv(x))``, no residual, no MLP.

    Params: ``query [n_queries, width]`` (logical ``(None, 'embed')``), ``norm_q`` (width),
    ``norm_kv`` (``context_width``), ``attn`` (:class:`layers.MultiHeadAttention` reading keys /
    values of width ``context_width``). ``x [B, T, context_width]``
    -> ``[B, n_queries, width]``.
    """

    def __init__(self, width: int, context_width: int, *, num_heads: int, n_queries: int,
                 ln_eps: float = 1e-5, dtype: layers.Dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = layers.as_dtype(dtype)
        self.n_queries = int(n_queries)
        self.query = layers.param(rngs, nnx.initializers.normal(1.0), (n_queries, width),
                                  (None, "embed"))
        self.norm_q = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.norm_kv = layers.LayerNorm(context_width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.attn = layers.MultiHeadAttention(width, num_heads, kv_width=context_width,
                                              dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm_kv(x)
        q = self.norm_q(self.query[...])
        q = jnp.broadcast_to(q[None], (x.shape[0],) + q.shape)
        return constrain(self.attn(q, x), *_X)


class CoCaVision(nnx.Module):
    """CoCa image tower: CLIP ViT trunk + attentional pooling (see the module docstring).

    Args: the :class:`~vlm_jax.models.vit.ViT` size arguments (``variant`` or ``width``,
    ``depth``, ``mlp_dim``, ``num_heads``, ``patch_size``), ``image_size``, ``pre_norm`` (True),
    ``patch_bias`` (False), ``act`` ('gelu'), ``ln_eps`` (1e-5), ``pos_embed_std`` /
    ``cls_std`` (default ``width ** -0.5``), ``pool_type`` (only ``'tok'``), ``num_classes``
    (only 0); ``output_dim`` = the model's ``embed_dim`` (pooler width); ``n_queries``,
    ``pooler_heads``, ``pooler_mode``, ``pooler_ln_eps`` (default ``ln_eps``); ``dtype``,
    ``remat``, ``scan_layers``; ``pixel_mean`` / ``pixel_std`` (uint8 input statistics, default
    CLIP's).

    Params: ``patch_embed``, ``cls_token``, ``pos_embed``, ``pre_norm``, ``encoder.blocks``,
    ``pooler``, (``pooler_contrastive``), ``final_norm``.
    """

    def __init__(self, variant: str | None = None, *, width: int | None = None,
                 depth: int | None = None, mlp_dim: int | None = None,
                 num_heads: int | None = None, patch_size: int | None = None,
                 image_size: int | tuple[int, int] = 224, pool_type: str = "tok",
                 num_classes: int = 0, pre_norm: bool = True, patch_bias: bool = False,
                 act: str = "gelu", ln_eps: float = 1e-5, pos_embed_std: float | None = None,
                 cls_std: float | None = None, output_dim: int, n_queries: int = 256,
                 pooler_heads: int = 8, pooler_mode: str = "single",
                 pooler_ln_eps: float | None = None, dtype: layers.Dtype = "float32",
                 remat: str = "none", scan_layers: bool = False,
                 pixel_mean: tuple[float, ...] | None = None,
                 pixel_std: tuple[float, ...] | None = None, rngs: nnx.Rngs):
        if pool_type != "tok":
            raise ValueError(f"model.image.pool_type={pool_type!r}: CoCa pools with its "
                             "attentional pooler; only 'tok' (open_clip's default) is supported.")
        if num_classes:
            raise ValueError("model.image.num_classes must be 0 for CoCa.")
        if pooler_mode not in POOLER_MODES:
            raise ValueError(f"Unknown model.pooler.mode {pooler_mode!r}; use one of "
                             f"{POOLER_MODES}.")
        if pooler_mode == "single" and n_queries < 2:
            raise ValueError(f"model.pooler.n_queries={n_queries}: the 'single' pooler uses "
                             "query 0 for the contrastive feature and the rest as captioning "
                             "context; it needs at least 2.")
        set_geometry(self, variant, image_size, width=width, depth=depth, mlp_dim=mlp_dim,
                     num_heads=num_heads, patch_size=patch_size)
        p = self.patch_size
        h, w = self.image_size
        self.num_patches = (h // p) * (w // p)
        self.output_dim = int(output_dim)
        self.pooler_mode = pooler_mode
        self.n_queries = int(n_queries)
        self.dtype = layers.as_dtype(dtype)
        width = self.width
        std = width ** -0.5
        pooler_ln_eps = ln_eps if pooler_ln_eps is None else pooler_ln_eps

        self.patch_embed = PatchEmbed(p, width, use_bias=patch_bias, dtype=dtype,
                                      pixel_mean=pixel_mean, pixel_std=pixel_std, rngs=rngs)
        self.cls_token = layers.param(rngs, nnx.initializers.normal(std if cls_std is None
                                                                    else cls_std),
                                      (width,), ("embed",))
        self.pos_embed = layers.param(
            rngs, nnx.initializers.normal(std if pos_embed_std is None else pos_embed_std),
            (self.num_patches + 1, width), ("pos", "embed"))
        self.pre_norm = (layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
                         if pre_norm else None)
        self.encoder = layers.Encoder(self.depth, width, self.num_heads, self.mlp_dim, act=act,
                                      causal=False, ln_eps=ln_eps, dtype=dtype, remat=remat,
                                      scan_layers=scan_layers, rngs=rngs)
        e = self.output_dim
        self.pooler = AttentionalPooler(e, width, num_heads=pooler_heads, n_queries=n_queries,
                                        ln_eps=pooler_ln_eps, dtype=dtype, rngs=rngs)
        if pooler_mode == "single":
            self.pooler_contrastive = None
            self.final_norm = layers.LayerNorm(e, eps=ln_eps, dtype=dtype, rngs=rngs)
        else:
            src = width if pooler_mode == "parallel" else e
            self.pooler_contrastive = AttentionalPooler(e, src, num_heads=pooler_heads,
                                                        n_queries=1, ln_eps=pooler_ln_eps,
                                                        dtype=dtype, rngs=rngs)
            self.final_norm = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)

    @property
    def num_context(self) -> int:
        """Number of captioning context tokens (``n_queries - 1`` in ``'single'`` mode)."""
        return self.n_queries - 1 if self.pooler_mode == "single" else self.n_queries

    def _check(self, images: jax.Array) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"CoCa expects images [batch, height, width, 3] (NHWC), got shape "
                             f"{tuple(images.shape)}.")
        if tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"Image size {images.shape[1]}x{images.shape[2]} differs from the "
                             f"image_size {self.image_size[0]}x{self.image_size[1]} this CoCa "
                             "was built for.")

    def trunk(self, images: jax.Array) -> jax.Array:
        """ViT output tokens ``[B, 1 + patches, width]`` (class token first), no final norm."""
        self._check(images)
        x = self.patch_embed(images)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        x = constrain(x, *_X)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return self.encoder(x)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``images [B, H, W, 3]`` -> ``(pooled [B, output_dim], context [B, num_context,
        output_dim])`` in ``dtype``; ``pooled`` is before ``image_projection``."""
        x = self.trunk(images)
        if self.pooler_mode == "single":
            y = self.final_norm(self.pooler(x))
            return y[:, 0], constrain(y[:, 1:], *_X)
        x = self.final_norm(x)
        tokens = self.pooler(x)
        src = x if self.pooler_mode == "parallel" else tokens
        return self.pooler_contrastive(src)[:, 0], tokens


# -------------------------------------------------------------------------------------------
# Text tower.
# -------------------------------------------------------------------------------------------


class CoCaText(nnx.Module):
    """CoCa unimodal text tower (open_clip ``TextTransformer(embed_cls=True)``).

    Args: ``width``, ``depth``, ``num_heads``, ``mlp_dim``, ``vocab_size``, ``context_length``
    (text tokens ``L``; ``pos_embed`` has ``L + 1`` rows for the appended CLS), ``pad_id`` (0),
    ``eos_id`` / ``bos_id`` (used by decoding only), ``correct_cls_mask`` (False: open_clip's
    legacy mask, see the module docstring), ``act`` ('gelu'), ``ln_eps`` (1e-5),
    ``token_init_std`` / ``pos_init_std`` / ``cls_init_std`` (0.02 / 0.01 / 0.01), ``dtype``,
    ``remat``, ``scan_layers``.

    Params: ``token_embed.embedding``, ``cls_token [width]``, ``pos_embed [L + 1, width]``,
    ``encoder.blocks`` (a :class:`layers.Encoder`, run here with the padding mask),
    ``final_norm``.
    """

    def __init__(self, *, width: int, depth: int, num_heads: int, mlp_dim: int,
                 vocab_size: int, context_length: int, pad_id: int = 0,
                 eos_id: int | None = None, bos_id: int | None = None,
                 correct_cls_mask: bool = False, act: str = "gelu", ln_eps: float = 1e-5,
                 token_init_std: float = 0.02, pos_init_std: float = 0.01,
                 cls_init_std: float = 0.01, dtype: layers.Dtype = "float32",
                 remat: str = "none", scan_layers: bool = False, rngs: nnx.Rngs):
        self.width, self.depth = width, depth
        self.num_heads, self.mlp_dim = num_heads, mlp_dim
        self.vocab_size, self.context_length = vocab_size, context_length
        self.pad_id, self.eos_id, self.bos_id = pad_id, eos_id, bos_id
        self.correct_cls_mask = bool(correct_cls_mask)
        self.dtype = layers.as_dtype(dtype)
        self.token_embed = layers.Embed(vocab_size, width,
                                        init=nnx.initializers.normal(token_init_std),
                                        dtype=dtype, rngs=rngs)
        self.cls_token = layers.param(rngs, nnx.initializers.normal(cls_init_std), (width,),
                                      ("embed",))
        self.pos_embed = layers.param(rngs, nnx.initializers.normal(pos_init_std),
                                      (context_length + 1, width), ("pos", "embed"))
        self.encoder = layers.Encoder(depth, width, num_heads, mlp_dim, act=act, causal=True,
                                      ln_eps=ln_eps, dtype=dtype, remat=remat,
                                      scan_layers=scan_layers, rngs=rngs)
        self.final_norm = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)

    def _check(self, tokens: jax.Array) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"CoCa expects integer tokens [batch, length], got shape "
                             f"{tuple(tokens.shape)} of {tokens.dtype}.")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"Token length {tokens.shape[1]} exceeds context_length "
                             f"{self.context_length}.")

    def key_valid(self, tokens: jax.Array, with_cls: bool) -> jax.Array:
        """Boolean ``[B, L (+1)]``: which keys may be attended (padding mask, see module doc)."""
        tok = tokens != self.pad_id
        one = jnp.ones(tokens.shape[:1] + (1,), jnp.bool_)
        valid = (jnp.concatenate([tok, one], 1) if self.correct_cls_mask
                 else jnp.concatenate([one, tok], 1))
        return valid if with_cls else valid[:, :tokens.shape[1]]

    def hidden(self, tokens: jax.Array, *, with_cls: bool) -> jax.Array:
        """Block outputs before ``final_norm``: ``[B, L, width]`` (``[B, L + 1, width]`` with
        the CLS appended)."""
        self._check(tokens)
        x = self.token_embed(tokens)
        if with_cls:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype),
                                   (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([x, cls], axis=1)
        n = x.shape[1]
        x = constrain(x + self.pos_embed[...][:n].astype(x.dtype), *_X)
        causal = jnp.tril(jnp.ones((n, n), jnp.bool_))
        mask = (causal[None] & self.key_valid(tokens, with_cls)[:, None, :])[:, None]
        return self.encoder(x, mask=mask)

    def step(self, tokens: jax.Array, cache: Mapping) -> tuple[jax.Array, dict]:
        """Block outputs ``[B, T, width]`` of ``tokens [B, T]`` at positions ``cache['index'] +
        arange(T)``, reading and extending the cache (``text_k``, ``text_v``, ``valid``,
        ``last_token``). Returns ``(x, updated text entries)``."""
        self._check(tokens)
        index = cache["index"]
        t = tokens.shape[1]
        lmax = cache["valid"].shape[1]
        pos = index + jnp.arange(t)
        if self.correct_cls_mask:
            new_valid = tokens != self.pad_id
        else:
            prev = jnp.concatenate([cache["last_token"][:, None], tokens[:, :-1]], axis=1)
            new_valid = (prev != self.pad_id) | (pos == 0)[None]
        valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], new_valid, index, 1)
        mask = (jnp.arange(lmax)[None, :] <= pos[:, None])[None] & valid[:, None, :]
        x = self.token_embed(tokens)
        pe = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], index, t, 0)
        x = constrain(x + pe.astype(x.dtype), *_X)
        x, kv = self.encoder(x, mask=mask[:, None], cache={"k": cache["text_k"],
                                                           "v": cache["text_v"]},
                             cache_index=index)
        return x, {"text_k": kv["k"], "text_v": kv["v"], "valid": valid,
                   "last_token": tokens[:, -1].astype(jnp.int32)}

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """``final_norm`` of the CLS output (the last position) ``[B, width]``."""
        return self.final_norm(hidden[:, -1])


# -------------------------------------------------------------------------------------------
# Multimodal decoder.
# -------------------------------------------------------------------------------------------


class CrossAttentionBlock(nnx.Module):
    """open_clip ``ResidualAttentionBlock(is_cross_attention=True)``:
    ``x + attn(norm1(x), norm1_kv(context))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, context_width: int, num_heads: int, mlp_dim: int, *,
                 act: str = "gelu", ln_eps: float = 1e-5, dtype: layers.Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = layers.as_dtype(dtype)
        self.norm1 = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.norm1_kv = layers.LayerNorm(context_width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.attn = layers.MultiHeadAttention(width, num_heads, kv_width=context_width,
                                              dtype=dtype, rngs=rngs)
        self.norm2 = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = layers.Mlp(width, mlp_dim, act=act, dtype=dtype, rngs=rngs)

    def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys / values ``[B, N, heads, kv]`` of the image context."""
        return self.attn.kv(self.norm1_kv(constrain(context, *_X)))

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        x = constrain(x.astype(self.dtype), *_X)
        x = constrain(x + self.attn(self.norm1(x), kv=(k, v)), *_X)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, *_X)


class DecoderLayer(nnx.Module):
    """One decoder layer: causal ``self_block`` (:class:`layers.TransformerBlock`) then
    ``cross_block`` (:class:`CrossAttentionBlock`)."""

    def __init__(self, width: int, context_width: int, num_heads: int, mlp_dim: int, *,
                 act: str, ln_eps: float, dtype: layers.Dtype, rngs: nnx.Rngs):
        self.self_block = layers.TransformerBlock(width, num_heads, mlp_dim, act=act,
                                                  causal=True, ln_eps=ln_eps, dtype=dtype,
                                                  rngs=rngs)
        self.cross_block = CrossAttentionBlock(width, context_width, num_heads, mlp_dim, act=act,
                                               ln_eps=ln_eps, dtype=dtype, rngs=rngs)


def _decoder_layer(layer: DecoderLayer, x, aux, per):
    if per is None:
        x, new = layer.self_block(x, mask=aux["mask"]), None
        ck, cv = layer.cross_block.context_kv(aux["context"])
    else:
        x, new = layer.self_block(x, mask=aux["mask"], cache={"k": per["k"], "v": per["v"]},
                                  cache_index=aux["index"])
        ck, cv = per["cross_k"], per["cross_v"]
    return layer.cross_block(x, ck, cv), new


def _cross_kv_layer(layer: DecoderLayer, x, aux, per):
    del per
    k, v = layer.cross_block.context_kv(aux["context"])
    return x, {"k": k, "v": v}


class MultimodalDecoder(nnx.Module):
    """open_clip ``MultimodalTransformer``: ``depth`` :class:`DecoderLayer` s, ``final_norm``,
    bias-free ``vocab_projection [width, vocab]`` (logical ``('embed', 'vocab')``).

    Params: ``blocks.{i}.self_block.*``, ``blocks.{i}.cross_block.*`` (stacked along
    ``'layers'`` with ``scan_layers``), ``final_norm``, ``vocab_projection.kernel``.
    """

    def __init__(self, *, width: int, context_width: int, vocab_size: int, depth: int,
                 num_heads: int, mlp_dim: int, act: str = "gelu", ln_eps: float = 1e-5,
                 dtype: layers.Dtype = "float32", remat: str = "none",
                 scan_layers: bool = False, rngs: nnx.Rngs):
        layers.remat_policy(remat)  # validate early
        self.width, self.depth, self.num_heads = width, depth, num_heads
        self.mlp_dim, self.vocab_size = mlp_dim, vocab_size
        self.remat, self.scan_layers = remat, bool(scan_layers)
        self.dtype = layers.as_dtype(dtype)

        def make(r: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(width, context_width, num_heads, mlp_dim, act=act,
                                ln_eps=ln_eps, dtype=dtype, rngs=r)

        self.blocks = layers.stack_layers(make, depth, scan=self.scan_layers, rngs=rngs)
        self.final_norm = layers.LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.vocab_projection = layers.Dense(width, vocab_size, ("embed", "vocab"),
                                             use_bias=False,
                                             kernel_init=nnx.initializers.normal(width ** -0.5),
                                             dtype=dtype, rngs=rngs)

    def _run(self, fn, x, aux, per):
        return layers.run_layers(self.blocks, fn, x, aux, per, scan=self.scan_layers,
                                 remat=self.remat)

    def logits(self, x: jax.Array) -> jax.Array:
        """``final_norm`` + ``vocab_projection``: ``[B, T, vocab]`` float32."""
        y = self.vocab_projection(self.final_norm(x))
        return constrain(y, "act_batch", "act_len", "act_vocab").astype(jnp.float32)

    def __call__(self, context: jax.Array, x: jax.Array, mask: jax.Array | None = None
                 ) -> jax.Array:
        """``context [B, N, context_width]``, text features ``x [B, T, width]`` -> logits
        ``[B, T, vocab]`` (causal self-attention, full cross-attention). ``mask``: a boolean
        self-attention mask ``[B or 1, 1, T, T]`` instead of the causal one (LocCa's parallel
        prediction attends both ways, :mod:`vlm_jax.models.locca`)."""
        t = x.shape[1]
        if mask is None:
            mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
        x, _ = self._run(_decoder_layer, x, {"mask": mask, "context": context}, None)
        return self.logits(x)

    def context_kv(self, context: jax.Array) -> dict:
        """Cross-attention keys/values of every layer: ``{'k', 'v'}`` of shape ``[depth, B, N,
        heads, kv]``."""
        dummy = jnp.zeros((), self.dtype)
        return self._run(_cross_kv_layer, dummy, {"context": context}, None)[1]

    def step(self, x: jax.Array, cache: Mapping) -> tuple[jax.Array, dict]:
        """Logits of text features ``x [B, T, width]`` at positions ``cache['index'] + arange(T)``
        using and extending the decoder entries of ``cache``."""
        index = cache["index"]
        t = x.shape[1]
        lmax = cache["dec_k"].shape[2]
        pos = index + jnp.arange(t)
        mask = (jnp.arange(lmax)[None, :] <= pos[:, None])[None, None]
        per = {"k": cache["dec_k"], "v": cache["dec_v"], "cross_k": cache["cross_k"],
               "cross_v": cache["cross_v"]}
        x, kv = self._run(_decoder_layer, x, {"mask": mask, "index": index}, per)
        return self.logits(x), {"dec_k": kv["k"], "dec_v": kv["v"]}


# -------------------------------------------------------------------------------------------
# The model.
# -------------------------------------------------------------------------------------------

_TOP_KEYS = {"name", "embed_dim", "image", "text", "decoder", "pooler", "logit_scale_init",
             "logit_scale_max", "logit_bias_init", "dtype", "remat", "scan_layers"}
_SHARED = ("dtype", "remat", "scan_layers")
_POOLER_KEYS = {"n_queries": "n_queries", "num_heads": "pooler_heads", "mode": "pooler_mode",
                "ln_eps": "pooler_ln_eps"}
_DECODER_KEYS = {"depth", "num_heads", "mlp_dim", "act", "ln_eps", "dtype", "remat",
                 "scan_layers"}
_IMAGE_KEYS = accepted_keys(CoCaVision) - {"output_dim", *(_POOLER_KEYS.values())}


def _image_kwargs(image: Mapping, pooler: Mapping, shared: Mapping, embed_dim: int) -> dict:
    kw = dict(image)
    check_keys(kw, _IMAGE_KEYS, "model.image")
    check_keys(pooler, set(_POOLER_KEYS), "model.pooler")
    for k in _SHARED:
        kw.setdefault(k, shared[k])
    for k, v in pooler.items():
        kw[_POOLER_KEYS[k]] = v
    kw["output_dim"] = embed_dim
    return kw


def _text_kwargs(text: Mapping, shared: Mapping) -> dict:
    return tower_kwargs(text, CoCaText, "model.text", shared)


def _decoder_kwargs(decoder: Mapping, text: Mapping, shared: Mapping) -> dict:
    kw = dict(decoder)
    check_keys(kw, _DECODER_KEYS, "model.decoder")
    for k in ("depth", "num_heads", "mlp_dim"):
        kw.setdefault(k, text[k])
    kw.setdefault("act", text.get("act", "gelu"))
    kw.setdefault("ln_eps", text.get("ln_eps", 1e-5))
    for k in _SHARED:
        kw.setdefault(k, shared[k])
    return kw


class CoCa(nnx.Module):
    """Contrastive captioner (see the module docstring for architecture and config).

    Parameters: ``image.*`` (:class:`CoCaVision`), ``text.*`` (:class:`CoCaText`),
    ``decoder.*`` (:class:`MultimodalDecoder`), ``image_projection.kernel [embed_dim,
    embed_dim]``, ``text_projection.kernel [text_width, embed_dim]``, ``logit_scale`` (and
    ``logit_bias`` with ``logit_bias_init``).
    """

    def __init__(self, *, embed_dim: int, image: Mapping, text: Mapping,
                 decoder: Mapping | None = None, pooler: Mapping | None = None,
                 logit_scale_init: float = math.log(1 / 0.07),
                 logit_scale_max: float = math.log(100.0), logit_bias_init: float | None = None,
                 dtype: layers.Dtype = "float32", remat: str = "none", scan_layers: bool = False,
                 rngs: nnx.Rngs):
        shared = dict(dtype=dtype, remat=remat, scan_layers=scan_layers)
        self.embed_dim = e = int(embed_dim)
        self.logit_scale_max = float(logit_scale_max)
        self.dtype = layers.as_dtype(dtype)
        text_kw = _text_kwargs(text, shared)
        self.image = CoCaVision(**_image_kwargs(image, pooler or {}, shared, e), rngs=rngs)
        self.text = CoCaText(**text_kw, rngs=rngs)
        self.decoder = MultimodalDecoder(width=self.text.width, context_width=e,
                                         vocab_size=self.text.vocab_size,
                                         **_decoder_kwargs(decoder or {}, text_kw, shared),
                                         rngs=rngs)
        self.image_projection = layers.Dense(
            e, e, ("embed", "proj"), use_bias=False,
            kernel_init=nnx.initializers.normal(self.image.width ** -0.5), dtype=dtype, rngs=rngs)
        tw = self.text.width
        self.text_projection = layers.Dense(
            tw, e, ("embed", "proj"), use_bias=False,
            kernel_init=nnx.initializers.normal(tw ** -0.5), dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, jnp.float32), out_sharding=())
        self.logit_bias = (None if logit_bias_init is None else
                           nnx.Param(jnp.asarray(logit_bias_init, jnp.float32), out_sharding=()))

    @classmethod
    def from_config(cls, cfg: Any, *, rngs: nnx.Rngs) -> "CoCa":
        """Builds from a model config dict / ConfigDict (see the module docstring)."""
        return from_config_dict(cls, cfg, _TOP_KEYS, rngs=rngs)

    # Token ids used by decoding.
    @property
    def bos_id(self) -> int | None:
        """Start-of-text id (``model.text.bos_id``)."""
        return self.text.bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-text id (``model.text.eos_id``)."""
        return self.text.eos_id

    @property
    def pad_id(self) -> int:
        """Padding id (``model.text.pad_id``), ignored by :func:`captioning_loss`."""
        return self.text.pad_id

    @property
    def context_length(self) -> int:
        """Number of text tokens ``L`` (the maximum caption length, bos included)."""
        return self.text.context_length

    # Image side.
    def image_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(image_emb [B, E] normalised float32, context [B, N, E])`` from one trunk pass."""
        pooled, context = self.image(images)
        return layers.l2_normalize(self.image_projection(pooled)), context

    def encode_image(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, 3]`` -> L2-normalised ``[B, embed_dim]`` float32."""
        return self.image_features(images)[0]

    def image_context(self, images: jax.Array) -> jax.Array:
        """The captioning pooler's output ``[B, N, embed_dim]`` (``N = n_queries - 1`` with
        ``pooler.mode='single'``, ``n_queries`` otherwise), in the compute dtype."""
        return self.image(images)[1]

    # Text side.
    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """``tokens int [B, L]`` -> L2-normalised ``[B, embed_dim]`` float32 (CLS feature)."""
        x = self.text.hidden(tokens, with_cls=True)
        return layers.l2_normalize(self.text_projection(self.text.pooled(x)))

    def temperature(self) -> jax.Array:
        """``exp(logit_scale)`` (float32 scalar). The parameter is kept in ``[0,
        logit_scale_max]`` by the training loop after each update
        (:func:`vlm_jax.families.clip.after_update`), as open_clip does, not clipped here, where
        the clip would cut its gradient at the bound."""
        return jnp.exp(self.logit_scale[...].astype(jnp.float32))

    # Captioning.
    def init_cache(self, batch: int, max_length: int | None = None,
                   context: jax.Array | None = None) -> dict:
        """An empty KV cache of ``batch`` rows for decoding ``max_length`` (default
        ``context_length``) tokens given the image ``context [batch, N, E]`` (required); the
        cross-attention keys/values of every decoder layer are computed here once.

        Entries: ``index`` (next position, int32 scalar), ``last_token [B]``, ``valid [B, Lmax]``
        (text-tower key mask), ``text_k|text_v [text_depth, B, Lmax, heads, kv]``,
        ``dec_k|dec_v [decoder_depth, B, Lmax, heads, kv]``, ``cross_k|cross_v
        [decoder_depth, B, N, heads, kv]``. Batch is axis 0 of ``last_token``/``valid`` and
        axis 1 of the others (:func:`reorder_cache`).
        """
        lmax = self.context_length if max_length is None else int(max_length)
        if lmax > self.context_length:
            raise ValueError(f"max_length {lmax} exceeds the text context_length "
                             f"{self.context_length}.")
        if context is None or context.shape[0] != batch:
            raise ValueError(f"CoCa.init_cache needs the image context of the {batch} rows "
                             "(image_context(images)).")
        b = batch
        t, d = self.text, self.decoder
        t_heads, t_hd = t.num_heads, t.width // t.num_heads
        d_heads, d_hd = d.num_heads, d.width // d.num_heads

        kv_axes = ("layers", *layers.CACHE_AXES)

        def z(depth, h, hd):
            return constrain(jnp.zeros((depth, b, lmax, h, hd), self.dtype), *kv_axes)

        cross = self.decoder.context_kv(context)
        return {"index": jnp.zeros((), jnp.int32),
                "last_token": jnp.full((b,), self.pad_id, jnp.int32),
                "valid": jnp.zeros((b, lmax), jnp.bool_),
                "text_k": z(t.depth, t_heads, t_hd), "text_v": z(t.depth, t_heads, t_hd),
                "dec_k": z(d.depth, d_heads, d_hd), "dec_v": z(d.depth, d_heads, d_hd),
                "cross_k": constrain(cross["k"].astype(self.dtype), *kv_axes),
                "cross_v": constrain(cross["v"].astype(self.dtype), *kv_axes)}

    def decode_logits(self, context: jax.Array | None, tokens: jax.Array, *,
                      cache: Mapping | None = None):
        """Next-token logits (float32) of the captioning decoder.

        Without ``cache``: ``tokens [B, L]`` (bos first) -> ``logits [B, L, vocab]``, position
        ``t`` predicting token ``t + 1`` (full causal forward, the teacher-forcing path).
        With ``cache`` (from :meth:`init_cache`; ``context`` is then unused and may be None):
        ``tokens [B, T]`` are the tokens at positions ``cache['index'] + arange(T)`` -> ``(logits
        [B, T, vocab], new cache)``; feeding a sequence token by token gives the logits of the
        full forward.
        """
        if cache is None:
            if context is None:
                raise ValueError("decode_logits needs the image context when no cache is given.")
            return self.decoder(context, self.text.hidden(tokens, with_cls=False))
        x, text_new = self.text.step(tokens, cache)
        logits, dec_new = self.decoder.step(x, cache)
        new = dict(cache)
        new.update(text_new)
        new.update(dec_new)
        new["index"] = cache["index"] + tokens.shape[1]
        return logits, new

    # The decoding protocol (vlm_jax.decoding).
    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a caption (``eos_id``)."""
        return () if self.eos_id is None else (self.eos_id,)

    def encode_context(self, images: jax.Array) -> jax.Array:
        """The decoding context: :meth:`image_context`."""
        return self.image_context(images)

    def step(self, tokens: jax.Array, cache: Mapping, valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict]:
        """``decode_logits(None, tokens, cache=cache)``. ``valid`` must be None: the text
        positions are absolute, so prompts are of one length, without padding."""
        _no_padding(valid)
        return self.decode_logits(None, tokens, cache=cache)

    def full_logits(self, tokens: jax.Array, valid: jax.Array | None = None,
                    context: jax.Array | None = None) -> jax.Array:
        """``decode_logits(context, tokens)``: the full causal forward (``valid`` as
        :meth:`step`)."""
        _no_padding(valid)
        return self.decode_logits(context, tokens)

    def reorder_cache(self, cache: Mapping, indices: jax.Array) -> dict:
        """:func:`reorder_cache`."""
        return reorder_cache(cache, indices)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        """Returns ``dict(image_emb [B, E], text_emb [B, E], logit_scale (), caption_logits
        [B, L, vocab])`` (plus ``logit_bias ()`` when the model has one). Embeddings are
        normalised float32, ``logit_scale`` exponentiated; ``caption_logits[:, t]``
        (float32) predicts ``tokens[:, t + 1]`` (labels ``tokens[:, 1:]``, see
        :func:`captioning_loss`)."""
        image_emb, context = self.image_features(images)
        x = self.text.hidden(tokens, with_cls=True)
        text_emb = layers.l2_normalize(self.text_projection(self.text.pooled(x)))
        out = dict(image_emb=image_emb, text_emb=text_emb, logit_scale=self.temperature(),
                   caption_logits=self.decoder(context, x[:, :-1]))
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias[...].astype(jnp.float32)
        return out


def _no_padding(valid) -> None:
    if valid is not None:
        raise ValueError("CoCa decodes prompts of one length without padding (its text "
                         "positions are absolute): pass no prompt_valid.")


_CACHE_BATCH_AXIS = {"last_token": 0, "valid": 0}


def reorder_cache(cache: Mapping, indices: jax.Array) -> dict:
    """The cache with its batch rows gathered by ``indices [B']`` (beam search reordering)."""
    out = {}
    for k, v in cache.items():
        out[k] = v if k == "index" else jnp.take(v, indices, axis=_CACHE_BATCH_AXIS.get(k, 1))
    return out


def captioning_loss(logits: jax.Array, tokens: jax.Array, pad_id: int) -> jax.Array:
    """Teacher-forcing cross-entropy, mean over the label tokens that are not ``pad_id``.

    ``logits [B, L, V]`` (as ``CoCa(...)['caption_logits']``; the last position is dropped) or
    ``[B, L - 1, V]`` (open_clip's), ``tokens [B, L]``; labels are ``tokens[:, 1:]``. Equals
    ``torch.nn.CrossEntropyLoss(ignore_index=pad_id)`` (open_clip ``CoCaLoss``) except that
    a batch without any label gives 0 instead of NaN. float32 scalar.
    """
    length = tokens.shape[1]
    if logits.shape[1] == length:
        logits = logits[:, :-1]
    if logits.shape[1] != length - 1:
        raise ValueError(f"captioning_loss: logits of length {logits.shape[1]} for tokens of "
                         f"length {length} (expected {length} or {length - 1}).")
    labels = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weight = (labels != pad_id).astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


# -------------------------------------------------------------------------------------------
# FLOPs and presets.
# -------------------------------------------------------------------------------------------


def _pooler_flops(n_q: int, width: int, kv_tokens: int, kv_width: int) -> float:
    macs = 2 * n_q * width * width  # query + out projections
    macs += 2 * kv_tokens * kv_width * width  # key + value projections
    macs += 2 * n_q * kv_tokens * width  # scores + weighted values
    return 2.0 * macs


def coca_flops(cfg: Any, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs (2 x MACs) per image-text pair of a CoCa config.

    ViT trunk (patch embedding + blocks), attentional pooler(s), image projection, text tower on
    ``L + 1`` tokens (CLS included) + text projection, decoder on ``L`` tokens (self-attention
    block, cross-attention to the ``N`` context tokens, two MLPs per layer) and the vocabulary
    projection. Attention is counted in full (no causal discount), as
    :func:`layers.attention_flops`. With ``batch_size`` the ``[B, B]`` similarity matmul is
    added.
    """
    cfg = to_plain_dict(cfg)
    shared = {k: cfg.get(k, d) for k, d in zip(_SHARED, ("float32", "none", False))}
    e = int(cfg["embed_dim"])
    pooler = cfg.get("pooler", {}) or {}
    img = _image_kwargs(cfg["image"], pooler, shared, e)
    txt = _text_kwargs(cfg["text"], shared)
    dec = _decoder_kwargs(cfg.get("decoder", {}) or {}, txt, shared)
    dims = resolve_dims(img.get("variant"), **{k: img.get(k) for k in
                                               ("width", "depth", "mlp_dim", "num_heads",
                                                "patch_size")})
    h, w = _pair(img.get("image_size", 224))
    p, iw = dims["patch_size"], dims["width"]
    n = (h // p) * (w // p)
    t_img = n + 1
    flops = 2.0 * n * p * p * 3 * iw
    flops += dims["depth"] * layers.attention_flops(t_img, iw, dims["mlp_dim"])
    n_q = int(img.get("n_queries", 256))
    mode = img.get("pooler_mode", "single")
    flops += _pooler_flops(n_q, e, t_img, iw)
    if mode == "parallel":
        flops += _pooler_flops(1, e, t_img, iw)
    elif mode == "cascade":
        flops += _pooler_flops(1, e, n_q, e)
    n_ctx = n_q - 1 if mode == "single" else n_q
    flops += 2.0 * e * e  # image projection
    tw, length = int(txt["width"]), int(txt["context_length"])
    flops += txt["depth"] * layers.attention_flops(length + 1, tw, txt["mlp_dim"])
    flops += 2.0 * tw * e  # text projection
    per_layer = layers.attention_flops(length, tw, dec["mlp_dim"])  # self block
    cross = 2 * length * tw * tw  # query + out
    cross += 2 * n_ctx * e * tw  # key + value from the context
    cross += 2 * length * n_ctx * tw  # scores + weighted values
    cross += 2 * length * tw * dec["mlp_dim"]  # MLP
    flops += dec["depth"] * (per_layer + 2.0 * cross)
    flops += 2.0 * length * tw * txt["vocab_size"]  # vocabulary projection
    if batch_size:
        flops += 2.0 * batch_size * e
    return flops


def _preset(embed_dim: int, variant: str, text_width: int, text_heads: int,
            decoder_heads: int) -> dict:
    return dict(
        name="coca", embed_dim=embed_dim,
        image=dict(variant=variant, image_size=224),
        text=dict(width=text_width, depth=12, num_heads=text_heads, mlp_dim=4 * text_width,
                  vocab_size=49408, context_length=76, bos_id=49406, eos_id=49407, pad_id=0,
                  act="gelu"),
        decoder=dict(depth=12, num_heads=decoder_heads, mlp_dim=4 * text_width),
        pooler=dict(n_queries=256, num_heads=8, mode="single"),
        logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0),
        dtype="float32", remat="none", scan_layers=False)


# open_clip model_configs/coca_ViT-B-32.json and coca_ViT-L-14.json (ViT heads = width // 64,
# which is big_vision's 'B' and 'L'; pooler heads 8 in both).
COCA_PRESETS: dict[str, dict] = {
    "coca_ViT-B-32": _preset(512, "B/32", 512, 8, 8),
    "coca_ViT-L-14": _preset(768, "L/14", 768, 12, 12),
}


def coca_config(name: str) -> dict:
    """The model config dict of a CoCa preset (``'coca_ViT-B-32'``; ``'coca_ViT-B/32'`` also
    accepted). Returns a fresh copy."""
    key = name
    if key not in COCA_PRESETS and "/" in key:
        key = key.replace("/", "-")
    if key not in COCA_PRESETS:
        raise ValueError(f"Unknown CoCa preset {name!r}; available: {sorted(COCA_PRESETS)}.")
    return copy.deepcopy(COCA_PRESETS[key])


__all__ = ["CoCa", "CoCaVision", "CoCaText", "MultimodalDecoder", "AttentionalPooler",
           "CrossAttentionBlock", "DecoderLayer", "POOLER_MODES", "COCA_PRESETS",
           "coca_config", "coca_flops", "captioning_loss", "reorder_cache"]
