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

from collections.abc import Callable, Sequence
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
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return jax.nn.relu
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"Unknown activation {name!r}; use one of {ACTIVATIONS}.")


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

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


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


class MultiHeadAttention(nnx.Module):
    """Multi-head dot-product attention with separate ``query``/``key``/``value``/``out``.

    Kernels: ``query|key|value.kernel [embed, heads, kv]``, ``out.kernel [heads, kv, embed]``.
    Logits and softmax are float32; ``causal=True`` masks future positions. Queries are scaled by
    ``head_dim ** -0.5``. Mathematically identical to ``torch.nn.MultiheadAttention`` (whose
    fused ``in_proj_weight`` splits into the three kernels).
    """

    def __init__(self, width: int, num_heads: int, *, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, causal: bool = False,
                 dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if head_dim is None:
            if width % num_heads:
                raise ValueError(f"width={width} is not divisible by num_heads={num_heads}.")
            head_dim = width // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.causal = causal
        self.dtype = as_dtype(dtype)
        hd = (num_heads, head_dim)
        qkv_names = ("embed", "heads", "kv")
        kw = dict(use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.query = Dense(width, hd, qkv_names, **kw)
        self.key = Dense(width, hd, qkv_names, **kw)
        self.value = Dense(width, hd, qkv_names, **kw)
        self.out = Dense(hd, width, ("heads", "kv", "embed"), use_bias=out_bias, dtype=dtype,
                         rngs=rngs)

    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        """``inputs_q [B, Lq, D]``, ``inputs_kv [B, Lk, D]`` (default: self-attention).

        ``mask``: optional boolean, broadcastable to ``[B, heads, Lq, Lk]``, True = attend.
        """
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        qkv_axes = ("act_batch", "act_len", "act_heads", "act_kv")
        q = constrain(self.query(inputs_q), *qkv_axes)
        k = constrain(self.key(inputs_kv), *qkv_axes)
        v = constrain(self.value(inputs_kv), *qkv_axes)
        q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if self.causal:
            lq, lk = logits.shape[-2:]
            causal = jnp.tril(jnp.ones((lq, lk), jnp.bool_), k=lk - lq)
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(self.dtype))
        y = constrain(y, *qkv_axes)
        return self.out(y)


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

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = ("act_batch", "act_len", "act_embed")
        x = constrain(x.astype(self.dtype), *axes)
        x = x + self.attn(self.norm1(x))
        x = constrain(x, *axes)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, *axes)


def _apply_block(block: TransformerBlock, x: jax.Array) -> jax.Array:
    return block(x)


class Encoder(nnx.Module):
    """A stack of ``depth`` :class:`TransformerBlock` s (no final norm).

    ``remat``: name of the rematerialisation policy applied per block (:func:`remat_policy`).
    ``scan_layers``: if True the block parameters are stacked along a leading axis with logical
    name ``'layers'`` (``blocks.attn.query.kernel [depth, embed, heads, kv]``) and run with
    ``nnx.scan``; otherwise they are ``blocks.0 ... blocks.{depth-1}``.
    """

    def __init__(self, depth: int, width: int, num_heads: int, mlp_dim: int, *,
                 act: str = "gelu", causal: bool = False, ln_eps: float = 1e-5,
                 dtype: Dtype = jnp.float32, remat: str = "none", scan_layers: bool = False,
                 rngs: nnx.Rngs):
        remat_policy(remat)  # validate early
        self.depth = depth
        self.remat = remat
        self.scan_layers = bool(scan_layers)

        def make(r: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(width, num_heads, mlp_dim, act=act, causal=causal,
                                    ln_eps=ln_eps, dtype=dtype, rngs=r)

        if self.scan_layers:
            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0,), out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stacked(r: nnx.Rngs) -> TransformerBlock:
                return make(r)

            self.blocks = make_stacked(rngs)
        else:
            self.blocks = nnx.List([make(rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        enabled, policy = remat_policy(self.remat)
        fn = _apply_block
        if enabled:
            fn = nnx.remat(_apply_block, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(carry: jax.Array, block: TransformerBlock) -> jax.Array:
                return fn(block, carry)

            return body(x, self.blocks)
        for block in self.blocks:
            x = fn(block, x)
        return x


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


# OpenAI CLIP pixel statistics (RGB, on [0, 1] values); the same numbers as
# input_pipeline.transforms.CLIP_MEAN / CLIP_STD, which normalise on the host.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 pixels ``[..., 3]`` -> ``(x / 255 - mean) / std`` in ``dtype`` (float input is
    returned cast, assumed already normalised). Input pipelines ship uint8 batches (4x fewer
    bytes to copy and transfer than float32) and the device normalises them here."""
    if not jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(dtype)
    mean = jnp.asarray(PIXEL_MEAN, jnp.float32) * 255
    inv_std = 1 / (jnp.asarray(PIXEL_STD, jnp.float32) * 255)
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
    "xavier_uniform", "LayerNorm", "Dense", "Embed", "MultiHeadAttention", "Mlp",
    "TransformerBlock", "Encoder", "MAPHead", "l2_normalize", "attention_flops",
]

