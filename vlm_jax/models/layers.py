"""Transformer building blocks shared by every vlm_jax model (Flax NNX).

Conventions (see ``docs``/DESIGN.md):

* Parameters are float32 ``nnx.Param`` s carrying *logical* axis names in their ``out_sharding``
  metadata (``embed``, ``mlp``, ``heads``, ``kv``, ``norm`` ...). They are never sharded eagerly;
  :func:`vlm_jax.parallel.state_shardings` maps the names to mesh axes.
* Matmuls run in the configurable compute ``dtype`` (parameters are cast at use); LayerNorm
  statistics and the attention softmax are computed in float32.
* Activations are constrained with :func:`vlm_jax.parallel.constrain` at block boundaries.
* No dropout: modules hold only ``nnx.Param`` state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm_jax.parallel import constrain

Dtype = Any
Initializer = Callable[..., jax.Array]

PARAM_DTYPE = jnp.float32

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable")


# -------------------------------------------------------------------------------------------
# Small helpers.
# -------------------------------------------------------------------------------------------


def as_dtype(dtype: Dtype) -> jnp.dtype:
    """Normalises a dtype given by name (``'bfloat16'``) or object to a ``jnp.dtype``."""
    if isinstance(dtype, str):
        names = {"float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
                 "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                 "float16": jnp.float16, "fp16": jnp.float16}
        if dtype not in names:
            raise ValueError(f"Unknown compute dtype {dtype!r}; use one of {sorted(names)}.")
        return jnp.dtype(names[dtype])
    return jnp.dtype(dtype)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          names: Sequence[str | None]) -> nnx.Param:
    """Creates a float32 ``nnx.Param`` of ``shape`` with logical axis ``names``."""
    shape = tuple(int(s) for s in shape)
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"Parameter of shape {shape} needs {len(shape)} logical names, got "
                         f"{names}.")
    return nnx.Param(init(next_key(rngs), shape, PARAM_DTYPE), out_sharding=names)


def next_key(rngs: nnx.Rngs) -> jax.Array:
    """``rngs.params()`` without its slow path under tracing.

    Same key sequence as ``rngs.params()``. NNX increments the stream counter with
    ``count[...] += 1``, whose ``sharding`` check on a tracer costs time linear in the size of the
    trace, making ``nnx.eval_shape`` of a large model quadratic (15 s for CLIP ViT-H/14); a whole
    replacement of the counter value avoids it.
    """
    stream = rngs.params
    key_var, count_var = getattr(stream, "key", None), getattr(stream, "count", None)
    if not isinstance(key_var, nnx.Variable) or not isinstance(count_var, nnx.Variable):
        return stream()
    count = count_var.get_value()
    key = jax.random.fold_in(key_var.get_value(), count)
    count_var.set_value(count + 1)
    return key


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation function by name.

    ``gelu`` is the exact (erf) GELU of PyTorch / open_clip; ``gelu_tanh`` the tanh approximation
    (flax/big_vision default); ``quick_gelu`` is ``x * sigmoid(1.702 x)`` used by OpenAI CLIP.
    """
    if name == "gelu":
        return _gelu_erf
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return jax.nn.relu
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"Unknown activation {name!r}; use one of {ACTIVATIONS}.")


def _gelu_erf(x: jax.Array) -> jax.Array:
    # PyTorch's formula, 0.5 x (1 + erf(x / sqrt 2)), rather than jax.nn.gelu's
    # x erfc(-x / sqrt 2) / 2: the same function within float32 rounding, and XLA's CPU erf is a
    # single rational polynomial where its erfc takes an exp and selects between branches.
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def remat_policy(name: str):
    """Maps a remat name to ``(enabled, jax checkpoint policy)``.

    ``'none'``: no rematerialisation. ``'full'`` / ``'nothing_saveable'``: recompute the whole
    block in the backward pass. ``'dots_saveable'`` / ``'dots_with_no_batch_dims_saveable'``: keep
    matmul outputs, recompute the element-wise ops.
    """
    if name == "none":
        return False, None
    if name in ("full", "nothing_saveable"):
        return True, jax.checkpoint_policies.nothing_saveable
    if name == "dots_saveable":
        return True, jax.checkpoint_policies.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"Unknown remat policy {name!r}; use one of {REMAT_POLICIES}.")


def xavier_uniform(n_in: int, n_out: int) -> Initializer:
    """Glorot-uniform initialiser for a kernel whose first ``n_in`` axes are inputs."""
    return nnx.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + n_out)))


# -------------------------------------------------------------------------------------------
# Layers.
# -------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32.

    Params ``scale`` and ``bias`` of shape ``[dim]`` with logical names ``('norm',)``. ``eps`` is
    1e-5 for (open_)CLIP / PyTorch and 1e-6 for big_vision ViTs. The output is cast to ``dtype``.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.eps = float(eps)
        self.dtype = as_dtype(dtype)
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",)) if use_bias else None

    @jax.named_scope("layer_norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return layer_norm(x, self.scale[...], bias, self.eps).astype(self.dtype)


def _layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(var + eps)
    xhat = (x32 - mean) * inv
    y = xhat * scale
    if bias is not None:
        y = y + bias
    # Residuals: the normalised input, the row scales, and empty arrays that carry the input's
    # dtype and whether there is a bias (custom_vjp residuals must be arrays).
    has_bias = None if bias is None else jnp.zeros((0,), jnp.float32)
    return y, (xhat, inv, scale, jnp.zeros((0,), x.dtype), has_bias)


def _layer_norm_bwd(eps, res, g):
    del eps
    xhat, inv, scale, x_dtype, has_bias = res
    g = g.astype(jnp.float32)
    gy = g * scale
    # d/dx of (x - mean) * rsqrt(var + eps): the textbook form, two row means.
    dx = inv * (gy - jnp.mean(gy, axis=-1, keepdims=True)
                - xhat * jnp.mean(gy * xhat, axis=-1, keepdims=True))
    rows = tuple(range(g.ndim - 1))
    dscale = jnp.sum(g * xhat, axis=rows)
    dbias = None if has_bias is None else jnp.sum(g, axis=rows)
    return dx.astype(x_dtype.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float
               ) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis of ``x``, in float32
    (the output is float32; ``bias`` may be None).

    The gradient is written out (``_layer_norm_bwd``: autodiff's derivative within float32
    rounding, two row means). Autodiff's own backward of this function leaves XLA's CPU
    backend a chain of elementwise ops through every layer norm and residual add of a tower,
    which it fuses into long loop fusions that recompute it: 46 % of ViT-B/32's CPU step (4.0
    s of 6.4 s; docs/benchmarks.md, "Where the CPU step's time goes")."""
    return _layer_norm(x, scale, bias, eps)[0]


layer_norm.defvjp(_layer_norm, _layer_norm_bwd)


class Dense(nnx.Module):
    """Linear map contracting the trailing ``len(in_shape)`` axes of the input.

    ``kernel`` has shape ``in_shape + out_shape`` and logical ``names`` (one per kernel axis);
    the optional ``bias`` has shape ``out_shape`` and the names of the output axes. Used for
    plain linears (``[embed] -> [mlp]``) as well as attention projections
    (``[embed] -> [heads, kv]`` and ``[heads, kv] -> [embed]``).
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int],
                 names: Sequence[str | None], *, use_bias: bool = True,
                 kernel_init: Initializer | None = None,
                 bias_init: Initializer = nnx.initializers.zeros,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.n_in = len(in_shape)
        self.dtype = as_dtype(dtype)
        kernel_init = kernel_init or xavier_uniform(len(in_shape), len(out_shape))
        names = tuple(names)
        self.kernel = param(rngs, kernel_init, in_shape + out_shape, names)
        self.bias = (param(rngs, bias_init, out_shape, names[self.n_in:]) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.n_in
        kernel = self.kernel[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Lookup table ``embedding[num_embeddings, features]`` with names ``('vocab', 'embed')``."""

    def __init__(self, num_embeddings: int, features: int, *,
                 init: Initializer = nnx.initializers.normal(0.02),
                 names: Sequence[str | None] = ("vocab", "embed"),
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = as_dtype(dtype)
        self.embedding = param(rngs, init, (num_embeddings, features), names)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


_QKV = ("act_batch", "act_len", "act_heads", "act_kv")
# Logical axes of a KV cache entry ``[batch, slots, kv_heads, head_dim]``: its own names, so that
# a decoding layout (e.g. cache heads over ``tensor``, slots unsharded) can differ from the
# activations' (``parallel.DEFAULT_RULES``).
CACHE_AXES = ("cache_batch", "cache_len", "cache_heads", "cache_kv")
_NEG = float(jnp.finfo(jnp.float32).min)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of ``x [B, L, H, D]`` at integer ``positions [B, L]``
    (HF ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin``), computed in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, L, 1, D]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


class MultiHeadAttention(nnx.Module):
    """The one dot-product attention of vlm_jax: self- or cross-attention, grouped-query heads,
    rotary or no positions (learned positions are added to the inputs by the model), boolean
    masks and an optional KV cache.

    Kernels: ``query.kernel [embed, heads, kv]``, ``key|value.kernel [embed, kv_heads, kv]``
    (``embed`` = ``kv_width``: the key/value inputs may be wider or narrower than the queries,
    torch's ``kdim``/``vdim``), ``out.kernel [heads, kv, embed]``; optional biases with the names
    of the output axes. ``num_kv_heads < num_heads`` groups the query heads (GQA / MQA: query
    head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``, as Hugging Face's
    ``repeat_kv``). Queries are scaled by ``head_dim ** -0.5``; logits and softmax are float32.
    With ``rope_theta`` the queries and keys are rotated at the given ``positions``
    (:func:`rotary`). ``causal=True`` masks keys after each query (with a cache: slots after
    ``cache_index + t``). Mathematically identical to ``torch.nn.MultiheadAttention`` (whose
    fused ``in_proj_weight`` splits into the three kernels) and to HF Llama / GPT-2 attention.

    The attention itself is written out (two einsums and a float32 softmax) rather than calling
    ``jax.nn.dot_product_attention``: the arithmetic must stay bitwise that of the converted
    checkpoints' parity tests, and masked rows / grouped heads / cache slots are handled here.
    """

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, kv_width: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, causal: bool = False,
                 rope_theta: float | None = None, kernel_init: Initializer | None = None,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if head_dim is None:
            if width % num_heads:
                raise ValueError(f"width={width} is not divisible by num_heads={num_heads}; "
                                 "set head_dim.")
            head_dim = width // num_heads
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}.")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal = causal
        self.rope_theta = rope_theta
        self.dtype = as_dtype(dtype)
        names = ("embed", "heads", "kv")
        kw = dict(use_bias=qkv_bias, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        kv_in = width if kv_width is None else kv_width
        self.query = Dense(width, (num_heads, head_dim), names, **kw)
        self.key = Dense(kv_in, (num_kv_heads, head_dim), names, **kw)
        self.value = Dense(kv_in, (num_kv_heads, head_dim), names, **kw)
        self.out = Dense((num_heads, head_dim), width, ("heads", "kv", "embed"),
                         use_bias=out_bias, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

    def kv(self, inputs_kv: jax.Array, positions: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
        """Keys and values ``[B, S, kv_heads, kv]`` of ``inputs_kv [B, S, kv_width]`` (keys
        rotated at ``positions [B, S]`` with rotary embeddings). Cross-attention to a fixed
        context computes them once and passes them back as ``kv=``."""
        k = constrain(self.key(inputs_kv), *_QKV)
        v = constrain(self.value(inputs_kv), *_QKV)
        if self.rope_theta is not None:
            k = rotary(k, self._positions(positions), self.rope_theta)
        return k, v

    def _positions(self, positions):
        if positions is None:
            raise ValueError("MultiHeadAttention with rope_theta needs the token positions "
                             "(positions=[batch, length]).")
        return positions

    def init_cache(self, batch: int, length: int, dtype: Dtype | None = None) -> dict:
        """An empty KV cache ``{'k', 'v'}`` of ``length`` slots, ``[B, length, kv_heads, kv]``
        each, with logical axes :data:`CACHE_AXES`."""
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        dt = self.dtype if dtype is None else as_dtype(dtype)
        return {n: constrain(jnp.zeros(shape, dt), *CACHE_AXES) for n in ("k", "v")}

    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask: jax.Array | None = None, positions: jax.Array | None = None,
                 kv: tuple[jax.Array, jax.Array] | None = None, cache: Mapping | None = None,
                 cache_index: jax.Array | None = None):
        """Attention of ``inputs_q [B, T, width]`` to ``inputs_kv [B, S, kv_width]`` (default:
        self-attention) or to precomputed ``kv`` (from :meth:`kv`).

        ``mask``: optional boolean broadcastable to ``[B, heads, T, S]``, True = attend (over the
        cache slots when a cache is given). ``positions [B, T]``: token positions for rotary
        embeddings. ``cache`` (``{'k', 'v'}`` from :meth:`init_cache`, ``S`` slots): the new
        keys/values are written at slots ``cache_index + arange(T)`` and the queries attend to
        all ``S`` slots. Returns ``[B, T, width]``, or ``(output, updated cache)`` when a cache
        is given.
        """
        q = constrain(self.query(inputs_q), *_QKV)
        if self.rope_theta is not None:
            if inputs_kv is not None or kv is not None:
                raise ValueError("Rotary embeddings are for self-attention; cross-attention "
                                 "takes no rope_theta.")
            q = rotary(q, self._positions(positions), self.rope_theta)
        if kv is None:
            k, v = self.kv(inputs_q if inputs_kv is None else inputs_kv, positions)
        else:
            k, v = kv
        new_cache = None
        if cache is not None:
            if cache_index is None:
                raise ValueError("A KV cache needs cache_index (the slot of the first new token).")
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                    cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                    cache_index, 1)
            k, v = constrain(k, *CACHE_AXES), constrain(v, *CACHE_AXES)
            new_cache = {"k": k, "v": v}
        if self.causal:
            lq, lk = q.shape[1], k.shape[1]
            if cache is None:
                causal = jnp.tril(jnp.ones((lq, lk), jnp.bool_), k=lk - lq)
            else:
                causal = jnp.arange(lk)[None, :] <= (cache_index + jnp.arange(lq))[:, None]
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        y = self.out(self._attend(q, k, v, mask))
        return y if cache is None else (y, new_cache)

    @jax.named_scope("attention")
    def _attend(self, q, k, v, mask):
        """``softmax(q k^T / sqrt(d) | mask) v`` for ``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``."""
        b, t, h, d = q.shape
        s = k.shape[1]
        group = h // self.num_kv_heads
        q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        if group == 1:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype),
                                preferred_element_type=jnp.float32)
        else:
            qg = q.reshape(b, t, self.num_kv_heads, group, d)
            logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(q.dtype),
                                preferred_element_type=jnp.float32).reshape(b, h, t, s)
        if mask is not None:
            logits = jnp.where(mask, logits, _NEG)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        if group == 1:
            y = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(self.dtype))
        else:
            probs = probs.reshape(b, self.num_kv_heads, group, t, s)
            y = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(self.dtype)).reshape(b, t, h, d)
        return constrain(y, *_QKV)


class Mlp(nnx.Module):
    """Two-layer MLP ``fc1 [embed, mlp] -> act -> fc2 [mlp, embed]`` (biases on both)."""

    def __init__(self, width: int, mlp_dim: int, *, act: str = "gelu",
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.act = act
        activation(act)  # validate early
        self.fc1 = Dense(width, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(mlp_dim, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.fc1(x), "act_batch", "act_len", "act_mlp")
        with jax.named_scope("activation"):
            h = activation(self.act)(h)
        return self.fc2(h)


class TransformerBlock(nnx.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, act: str = "gelu",
                 causal: bool = False, ln_eps: float = 1e-5, dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = as_dtype(dtype)
        self.norm1 = LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadAttention(width, num_heads, causal=causal, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, act=act, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 cache: Mapping | None = None, cache_index: jax.Array | None = None):
        """``x [B, L, width]``; ``mask``/``cache``/``cache_index`` as
        :class:`MultiHeadAttention`. Returns ``x``, or ``(x, updated cache)`` with a cache."""
        axes = ("act_batch", "act_len", "act_embed")
        x = constrain(x.astype(self.dtype), *axes)
        h = self.attn(self.norm1(x), mask=mask, cache=cache, cache_index=cache_index)
        h, new_cache = (h, None) if cache is None else h
        x = x + h
        x = constrain(x, *axes)
        x = x + self.mlp(self.norm2(x))
        x = constrain(x, *axes)
        return x if cache is None else (x, new_cache)


# -------------------------------------------------------------------------------------------
# The layer stack: unrolled or scanned, with remat, per-layer inputs / outputs and hooks.
# -------------------------------------------------------------------------------------------


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], depth: int, *, scan: bool,
                 rngs: nnx.Rngs):
    """``depth`` modules from ``make(rngs)``: an ``nnx.List`` (parameters ``blocks.0 ...``) or,
    with ``scan``, one module whose parameters are stacked along a leading axis with logical
    name ``'layers'`` (``blocks.attn.query.kernel [depth, embed, heads, kv]``), built by
    ``nnx.vmap`` over ``depth`` split keys. Store the result as the owner's ``blocks`` and run it
    with :func:`run_layers`."""
    if scan:
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_stacked(r: nnx.Rngs) -> nnx.Module:
            return make(r)

        return make_stacked(rngs)
    return nnx.List([make(rngs) for _ in range(depth)])


def _num_layers(stacked) -> int:
    return jax.tree.leaves(nnx.state(stacked))[0].shape[0]


def _slice_layers(blocks, start: int, stop: int):
    """Layers ``start:stop`` of a stacked (scanned) module, as a stacked module."""
    graphdef, state = nnx.split(blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


def run_layers(blocks, fn: Callable, x: jax.Array, aux: Any = None, per_layer: Any = None, *,
               scan: bool, remat: str = "none",
               before: Mapping[int, Callable[[jax.Array], jax.Array]] | None = None
               ) -> tuple[jax.Array, Any]:
    """Runs ``x, out_i = fn(block_i, x, aux, per_layer_i)`` over a stack from
    :func:`stack_layers` (the one layer loop of every vlm_jax model).

    ``aux``: a pytree shared by every layer (masks, positions, a context). ``per_layer``: a
    pytree whose leaves have a leading layer axis (a KV cache), or None; layer ``i`` gets their
    ``[i]`` slices. The ``out_i`` are stacked along a new leading axis (None if ``fn`` returns
    None). ``remat`` (:func:`remat_policy`) checkpoints each layer. ``scan``: ``blocks`` is
    stacked and runs under ``nnx.scan`` (one compiled layer body). ``before[i](x)`` runs before
    layer ``i`` (Flamingo's cross-attention blocks); a scanned stack then runs as one scan per
    segment between hooks (``nnx.scan`` over a slice of the stacked parameters), so the
    compiled program holds one layer body per segment, not one per layer.
    """
    enabled, policy = remat_policy(remat)
    if enabled:
        fn = nnx.remat(fn, policy=policy, prevent_cse=not scan)
    before = dict(before or {})
    if not scan:
        outs = []
        for i, block in enumerate(blocks):
            if i in before:
                x = before[i](x)
            per = None if per_layer is None else jax.tree.map(lambda a, i=i: a[i], per_layer)
            x, out = fn(block, x, aux, per)
            outs.append(out)
        if not outs or outs[0] is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    @nnx.scan(in_axes=(nnx.Carry, 0, None, 0), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def body(carry, block, aux_, per):
        return fn(block, carry, aux_, per)

    if not before:
        return body(x, blocks, aux, per_layer)
    depth = _num_layers(blocks)
    bounds = sorted({0, depth, *(i for i in before if 0 < i < depth)})
    outs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if start in before:
            x = before[start](x)
        per = (None if per_layer is None
               else jax.tree.map(lambda a, s=start, e=stop: a[s:e], per_layer))
        x, out = body(x, _slice_layers(blocks, start, stop), aux, per)
        outs.append(out)
    if outs[0] is None:
        return x, None
    return x, jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


def _encoder_layer(block: TransformerBlock, x, aux, cache):
    """``aux``: the mask (or None); with a cache ``{'mask', 'index'}``."""
    if cache is None:
        return block(x, mask=aux), None
    return block(x, mask=aux["mask"], cache=cache, cache_index=aux["index"])


class Encoder(nnx.Module):
    """A stack of ``depth`` :class:`TransformerBlock` s (no final norm).

    ``remat``: name of the rematerialisation policy applied per block (:func:`remat_policy`).
    ``scan_layers``: if True the block parameters are stacked along a leading axis with logical
    name ``'layers'`` (``blocks.attn.query.kernel [depth, embed, heads, kv]``) and run with
    ``nnx.scan``; otherwise they are ``blocks.0 ... blocks.{depth-1}``
    (:func:`stack_layers` / :func:`run_layers`).
    """

    def __init__(self, depth: int, width: int, num_heads: int, mlp_dim: int, *,
                 act: str = "gelu", causal: bool = False, ln_eps: float = 1e-5,
                 dtype: Dtype = jnp.float32, remat: str = "none", scan_layers: bool = False,
                 rngs: nnx.Rngs):
        remat_policy(remat)  # validate early
        self.depth = depth
        self.remat = remat
        self.scan_layers = bool(scan_layers)
        self.blocks = stack_layers(
            lambda r: TransformerBlock(width, num_heads, mlp_dim, act=act, causal=causal,
                                       ln_eps=ln_eps, dtype=dtype, rngs=r),
            depth, scan=self.scan_layers, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 cache: Mapping | None = None, cache_index: jax.Array | None = None):
        """``x [B, L, width]`` through every block. With a ``cache`` (``{'k', 'v'}`` of shape
        ``[depth, B, S, heads, kv]``) returns ``(x, updated cache)``."""
        run = functools.partial(run_layers, self.blocks, _encoder_layer, scan=self.scan_layers,
                                remat=self.remat)
        if cache is None:
            return run(x, mask)[0]
        return run(x, {"mask": mask, "index": cache_index}, cache)


class MAPHead(nnx.Module):
    """Multihead attention pooling (big_vision ``MAPHead``).

    A learned ``probe [1, 1, embed]`` attends to the tokens; then ``x + mlp(norm(x))``. Returns
    ``[B, width]``.
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, act: str = "gelu",
                 ln_eps: float = 1e-6, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = as_dtype(dtype)
        self.probe = param(rngs, nnx.initializers.xavier_uniform(), (1, 1, width),
                           (None, None, "embed"))
        self.attn = MultiHeadAttention(width, num_heads, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(width, eps=ln_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, act=act, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, x.astype(self.dtype))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


# OpenAI CLIP pixel statistics (RGB, on [0, 1] values), as open_clip uses them. The only copy:
# every input pipeline ships uint8 pixels and the models normalise them here, on the device.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images: jax.Array, dtype: Any = jnp.float32,
                     mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> jax.Array:
    """uint8 pixels ``[..., 3]`` -> ``(x / 255 - mean) / std`` in ``dtype`` (float input is
    returned cast, assumed already normalised). Input pipelines ship uint8 batches (4x fewer
    bytes to copy and transfer than float32) and the device normalises them here. ``mean`` /
    ``std``: per channel, on the [0, 1] scale (default CLIP's :data:`PIXEL_MEAN` /
    :data:`PIXEL_STD`; an imported model may bring others, e.g. 0.5 / 0.5)."""
    if not jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(dtype)
    mean = jnp.asarray(PIXEL_MEAN if mean is None else mean, jnp.float32) * 255
    inv_std = 1 / (jnp.asarray(PIXEL_STD if std is None else std, jnp.float32) * 255)
    return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis, in float32 (as ``F.normalize``)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def attention_flops(num_tokens: int, width: int, mlp_dim: int,
                    kv_tokens: int | None = None) -> float:
    """Forward matmul FLOPs (2 x MACs) of one transformer block on one example.

    ``kv_tokens`` defaults to ``num_tokens`` (self-attention). Attention scores and values are
    counted in full (no causal discount), as open_clip's profiler and the PaLM MFU formula do.
    """
    t = num_tokens
    s = t if kv_tokens is None else kv_tokens
    macs = t * width * width  # query
    macs += 2 * s * width * width  # key, value
    macs += t * width * width  # out
    macs += 2 * t * s * width  # scores + weighted values
    macs += 2 * t * width * mlp_dim  # mlp
    return 2.0 * macs


__all__ = [
    "ACTIVATIONS", "REMAT_POLICIES", "as_dtype", "param", "activation", "remat_policy",
    "xavier_uniform", "LayerNorm", "Dense", "Embed", "MultiHeadAttention", "CACHE_AXES",
    "rotary", "Mlp", "TransformerBlock", "stack_layers", "run_layers", "Encoder", "MAPHead",
    "l2_normalize", "attention_flops",
]

