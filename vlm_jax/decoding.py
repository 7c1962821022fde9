"""Autoregressive caption decoding for :class:`~vlm_jax.models.coca.CoCa` (jit-compiled, batched).

    tokens = generate(model, images, method='beam', beam_size=4)        # int32 [B, L]
    tokens = generate(graphdef, images, params=state, method='sample', top_p=0.9, rng=key)

Every method starts from ``bos_id`` at position 0 and writes one token per step up to
``max_length`` (default: the model's text ``context_length``); a row stops at its first
``eos_id`` and is ``pad_id`` after it. The image is encoded once (:meth:`CoCa.image_context`).

* **KV cache**: with ``use_cache=True`` (default) each step feeds only the newest token through
  the text tower and the decoder, reading keys/values of the earlier positions from
  :meth:`CoCa.init_cache` arrays carried through a ``jax.lax.while_loop``; the cross-attention
  keys/values of the image context are computed once. ``use_cache=False`` recomputes the full
  causal forward over the whole ``[B, L]`` buffer at every step (the reference path; same
  tokens). The loop ends early once every row (or beam group) is finished.
* **greedy**: argmax of the next-token logits.
* **sample**: ``logits / temperature``, then top-k (keep logits >= the k-th largest; 0 = off),
  then top-p (the nucleus: the most probable tokens, in descending order, up to and including
  the first one at which the cumulative probability reaches ``top_p``; 1.0 = off), then a
  categorical draw with ``jax.random.fold_in(rng, step)``. ``top_k=1`` is greedy.
* **beam search** (as Hugging Face's ``BeamSearchScorer``, which open_clip's CoCa uses, with
  ``num_beam_groups=1``): each step takes the top ``2 * beam_size`` continuations of the alive
  beams by summed log-probability; an ``eos`` continuation ranked within the first
  ``beam_size`` becomes a finished hypothesis scored ``logp / n ** length_penalty`` (``n``:
  tokens generated, ``eos`` included), the best ``beam_size`` non-eos continuations stay alive.
  ``early_stopping=True``: a batch row is done once it has ``beam_size`` finished hypotheses
  (so ``beam_size=1`` is exactly greedy); ``False``: only once no alive beam can still beat the
  worst finished one (the bound at the maximum length, like HF's ``early_stopping='never'``).
  At the maximum length, unfinished rows add their alive beams (``n = max_length - 1``; HF
  counts the bos there too). The best hypothesis is returned.
* ``min_length``: ``eos`` is forbidden before position ``min_length`` (open_clip's
  ``MinLengthLogitsProcessor``; open_clip's ``generate`` uses 5).

Not implemented from open_clip's ``generate``: repetition penalty, diverse beam groups
(``num_beam_groups > 1``), forcing ``eos`` at the last position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.models.coca import reorder_cache

METHODS = ("greedy", "beam", "sample")
_NEG_INF = -jnp.inf


# -------------------------------------------------------------------------------------------
# Logit processing.
# -------------------------------------------------------------------------------------------


def forbid_eos(logits: jax.Array, forbid: jax.Array, eos_id: int) -> jax.Array:
    """``logits [..., V]`` with the ``eos_id`` entry set to -inf where ``forbid`` (scalar)."""
    col = jnp.arange(logits.shape[-1]) == eos_id
    return jnp.where(forbid & col, _NEG_INF, logits)


def _is_static(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _per_row(x, dtype, ndim: int) -> jax.Array:
    """A scalar or per-row ``[B]`` setting as an array broadcastable to ``[B, V]``."""
    x = jnp.asarray(x, dtype)
    return x[:, None] if x.ndim == 1 and ndim == 2 else x


def top_k_filter(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keeps the logits ``>=`` the ``k``-th largest of each row (others -inf); ``k <= 0``: all.

    ``k``: a Python int, or a traced int scalar or per-row ``[B]`` array (then a full sort finds
    the thresholds)."""
    vocab = logits.shape[-1]
    if _is_static(k):
        if k <= 0 or k >= vocab:
            return logits
        kth = jax.lax.top_k(logits, int(k))[0][..., -1:]
        return jnp.where(logits < kth, _NEG_INF, logits)
    k = _per_row(k, jnp.int32, logits.ndim)
    desc = -jnp.sort(-logits, axis=-1)
    idx = jnp.broadcast_to(jnp.clip(k, 1, vocab) - 1, logits.shape[:-1] + (1,))
    kth = jnp.take_along_axis(desc, idx, axis=-1)
    return jnp.where((k > 0) & (logits < kth), _NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keeps, per row, the most probable tokens whose preceding cumulative
    probability (descending order) is below ``p`` (always at least the top token); others -inf.
    ``p >= 1``: all. ``p`` may be traced, a scalar or per-row ``[B]``."""
    if _is_static(p) and p >= 1.0:
        return logits
    p = _per_row(p, jnp.float32, logits.ndim)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (before < p) | (jnp.arange(logits.shape[-1]) == 0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep | (p >= 1.0), logits, _NEG_INF)


# -------------------------------------------------------------------------------------------
# Next-token logits, with or without the cache.
# -------------------------------------------------------------------------------------------


def _next_logits(model, context, tokens, t, cache, use_cache: bool):
    """Logits ``[B, V]`` at position ``t`` of ``tokens [B, L]`` (and the updated cache)."""
    if use_cache:
        tok = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
        logits, cache = model.decode_logits(None, tok, cache=cache)
        return logits[:, 0], cache
    logits = model.decode_logits(context, tokens)
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), cache


def _ids(model, bos_id, eos_id, pad_id):
    bos_id = getattr(model, "bos_id", None) if bos_id is None else bos_id
    eos_id = getattr(model, "eos_id", None) if eos_id is None else eos_id
    pad_id = getattr(model, "pad_id", 0) if pad_id is None else pad_id
    if bos_id is None or eos_id is None:
        raise ValueError("Decoding needs bos_id and eos_id: set model.text.bos_id / eos_id in "
                         "the config or pass them.")
    return int(bos_id), int(eos_id), int(pad_id)


def _max_length(model, max_length):
    length = model.context_length if max_length is None else int(max_length)
    if not 2 <= length <= model.context_length:
        raise ValueError(f"max_length={length} must be in [2, context_length="
                         f"{model.context_length}].")
    return length


# -------------------------------------------------------------------------------------------
# Greedy and sampling.
# -------------------------------------------------------------------------------------------


def _token_loop(model, context, choose: Callable, *, max_length, min_length, bos_id, eos_id,
                pad_id, use_cache):
    b = context.shape[0]
    length = max_length
    tokens = jnp.full((b, length), pad_id, jnp.int32).at[:, 0].set(bos_id)
    done = jnp.zeros((b,), jnp.bool_)
    cache = model.init_cache(context, max_length=length) if use_cache else None
    graphdef, params = nnx.split(model)

    def cond(state):
        t, _, done, _, _ = state
        return (t < length - 1) & ~jnp.all(done)

    def body(state):
        t, tokens, done, cache, params = state
        m = nnx.merge(graphdef, params)
        logits, cache = _next_logits(m, context, tokens, t, cache, use_cache)
        logits = forbid_eos(logits.astype(jnp.float32), t + 1 < min_length, eos_id)
        nxt = jnp.where(done, pad_id, choose(logits, t).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], t + 1, axis=1)
        return t + 1, tokens, done | (nxt == eos_id), cache, params

    state = (jnp.zeros((), jnp.int32), tokens, done, cache, params)
    return jax.lax.while_loop(cond, body, state)[1]


def greedy(model, context: jax.Array, *, max_length: int | None = None, min_length: int = 0,
           bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
           use_cache: bool = True) -> jax.Array:
    """Greedy decoding from the image ``context [B, N, E]`` -> int32 tokens ``[B, L]``.

    ``model``: a (merged) :class:`CoCa`; call under ``jax.jit`` (or use :func:`generate`).
    """
    bos_id, eos_id, pad_id = _ids(model, bos_id, eos_id, pad_id)
    return _token_loop(model, context, lambda logits, t: jnp.argmax(logits, axis=-1),
                       max_length=_max_length(model, max_length), min_length=min_length,
                       bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, use_cache=use_cache)


def sample(model, context: jax.Array, rng: jax.Array, *, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, max_length: int | None = None,
           min_length: int = 0, bos_id: int | None = None, eos_id: int | None = None,
           pad_id: int | None = None, use_cache: bool = True) -> jax.Array:
    """Sampling with temperature, top-k and nucleus (top-p) filtering -> int32 ``[B, L]``.

    ``temperature``, ``top_k``, ``top_p``: Python numbers, traced scalars or per-row ``[B]``
    arrays. The draw at step ``t`` (producing position ``t + 1``) uses
    ``jax.random.fold_in(rng, t)``.
    """
    if _is_static(temperature) and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy for 0).")
    bos_id, eos_id, pad_id = _ids(model, bos_id, eos_id, pad_id)

    temp = temperature if _is_static(temperature) else _per_row(temperature, jnp.float32, 2)

    def choose(logits, t):
        logits = top_p_filter(top_k_filter(logits / temp, top_k), top_p)
        return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)

    return _token_loop(model, context, choose, max_length=_max_length(model, max_length),
                       min_length=min_length, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                       use_cache=use_cache)


# -------------------------------------------------------------------------------------------
# Beam search.
# -------------------------------------------------------------------------------------------


def beam_search(model, context: jax.Array, *, beam_size: int = 4, length_penalty: float = 1.0,
                early_stopping: bool = True, max_length: int | None = None,
                min_length: int = 0, bos_id: int | None = None, eos_id: int | None = None,
                pad_id: int | None = None, use_cache: bool = True
                ) -> tuple[jax.Array, jax.Array]:
    """Beam search (see the module docstring) -> ``(tokens int32 [B, L], scores float32 [B])``;
    the score is the length-normalised log-probability of the returned hypothesis."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1.")
    bos_id, eos_id, pad_id = _ids(model, bos_id, eos_id, pad_id)
    length = _max_length(model, max_length)
    b, k = context.shape[0], int(beam_size)
    alpha = length_penalty
    ctx = jnp.repeat(context, k, axis=0)  # row b * k + j: beam j of image b
    seqs = jnp.full((b, k, length), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    first = jnp.where(jnp.arange(k) == 0, 0.0, _NEG_INF).astype(jnp.float32)
    alive_logp = jnp.tile(first[None], (b, 1))
    fin_seqs = seqs
    fin_scores = jnp.full((b, k), _NEG_INF, jnp.float32)
    done = jnp.zeros((b,), jnp.bool_)
    cache = model.init_cache(ctx, max_length=length) if use_cache else None
    graphdef, params = nnx.split(model)

    def norm(n):
        return jnp.power(jnp.asarray(n, jnp.float32), alpha)

    def cond(state):
        t, done = state[0], state[5]
        return (t < length - 1) & ~jnp.all(done)

    def body(state):
        t, seqs, alive_logp, fin_seqs, fin_scores, done, cache, params = state
        m = nnx.merge(graphdef, params)
        logits, cache = _next_logits(m, ctx, seqs.reshape(b * k, length), t, cache,
                                     use_cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = forbid_eos(logp, t + 1 < min_length, eos_id)
        vocab = logp.shape[-1]
        cand = (alive_logp[:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
        top_scores, top_idx = jax.lax.top_k(cand, 2 * k)  # [B, 2K], sorted
        beam, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand_seqs = jnp.take_along_axis(seqs, beam[:, :, None], axis=1)
        cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, tok[:, :, None], t + 1, 2)
        is_eos = tok == eos_id
        # Finished hypotheses: eos continuations ranked within the first K (HF's rule).
        new_fin = (is_eos & (jnp.arange(2 * k) < k)[None] & jnp.isfinite(top_scores)
                   & ~done[:, None])
        new_scores = jnp.where(new_fin, top_scores / norm(t + 1), _NEG_INF)
        all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
        fin_scores, pick = jax.lax.top_k(all_scores, k)
        fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, cand_seqs], axis=1),
                                       pick[:, :, None], axis=1)
        # Alive beams: the best K non-eos continuations.
        alive_logp, pick = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, top_scores), k)
        seqs = jnp.take_along_axis(cand_seqs, pick[:, :, None], axis=1)
        if use_cache:
            src = jnp.take_along_axis(beam, pick, axis=1) + (jnp.arange(b) * k)[:, None]
            cache = reorder_cache(cache, src.reshape(-1))
        full = jnp.sum(jnp.isfinite(fin_scores), axis=1) >= k
        if early_stopping:
            now_done = full
        else:
            bound_len = jnp.where(jnp.asarray(alpha) > 0, length - 1, t + 1)
            now_done = full & (fin_scores[:, -1] >= alive_logp[:, 0] / norm(bound_len))
        return t + 1, seqs, alive_logp, fin_seqs, fin_scores, done | now_done, cache, params

    state = (jnp.zeros((), jnp.int32), seqs, alive_logp, fin_seqs, fin_scores, done, cache,
             params)
    _, seqs, alive_logp, fin_seqs, fin_scores, done, _, _ = jax.lax.while_loop(cond, body,
                                                                               state)
    # Rows not done reached the maximum length: their alive beams compete too.
    alive_scores = jnp.where(done[:, None], _NEG_INF, alive_logp / norm(length - 1))
    scores = jnp.concatenate([fin_scores, alive_scores], axis=1)
    best = jnp.argmax(scores, axis=1)
    tokens = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1),
                                 best[:, None, None], axis=1)[:, 0]
    return tokens, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


# -------------------------------------------------------------------------------------------
# Entry point.
# -------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "options", "mesh", "rules"))
def _generate_jit(graphdef, state, images, rng, dynamic, *, method, options, mesh, rules):
    with parallel.sharding_context(mesh, rules):
        model = nnx.merge(graphdef, state)
        return _decode(model, images, rng, method, {**dict(options), **dynamic})


def _decode(model, images, rng, method, options):
    context = model.image_context(images)
    if method == "greedy":
        return greedy(model, context, **options)
    if method == "sample":
        return sample(model, context, rng, **options)
    return beam_search(model, context, **options)[0]


# Options passed to the compiled decode as traced values (no recompilation when they change);
# top_k / top_p only when they are on (off = no filtering code at all).
_DYNAMIC = {"temperature": jnp.float32, "length_penalty": jnp.float32, "min_length": jnp.int32,
            "top_k": jnp.int32, "top_p": jnp.float32}
_OFF = {"top_k": 0, "top_p": 1.0}


_COMMON = ("max_length", "min_length", "bos_id", "eos_id", "pad_id", "use_cache")
_OPTIONS = {"greedy": _COMMON,
            "sample": _COMMON + ("temperature", "top_k", "top_p"),
            "beam": _COMMON + ("beam_size", "length_penalty", "early_stopping")}


def generate(model: Any, images: jax.Array, *, params: Any = None, method: str = "greedy",
             rng: jax.Array | None = None, jit: bool = True, mesh: Mesh | None = None,
             rules: Any = None, **options: Any) -> jax.Array:
    """Captions for ``images [B, H, W, 3]`` as int32 tokens ``[B, max_length]`` (bos first,
    pad after the first eos).

    Args:
      model: a :class:`~vlm_jax.models.coca.CoCa`, or its ``nnx.GraphDef`` with ``params`` (an
        ``nnx.State`` or the pure dict of it, e.g. a train state's ``params``).
      method: ``'greedy'``, ``'beam'`` or ``'sample'``.
      rng: PRNG key, required for ``'sample'``.
      jit: compile the whole decode (default). With ``jit=False`` the call is traced inline, for
        use inside the caller's own ``jax.jit`` (and its :func:`parallel.sharding_context`).
      mesh, rules: with ``jit=True``, trace under ``parallel.sharding_context(mesh, rules)``
        (activation constraints; default rules :data:`parallel.DEFAULT_RULES`). Shard the
        params (``parallel.state_shardings``) and images (batch axes) before the call.
      options: ``max_length`` (default the text context length), ``min_length`` (0),
        ``bos_id`` / ``eos_id`` / ``pad_id`` (default the model's), ``use_cache`` (True);
        for ``'sample'``: ``temperature`` (1.0), ``top_k`` (0 = off), ``top_p`` (1.0 = off);
        for ``'beam'``: ``beam_size`` (4), ``length_penalty`` (1.0), ``early_stopping`` (True).
        ``temperature``, ``length_penalty``, ``min_length`` and (when on) ``top_k`` /
        ``top_p`` are traced: changing their values does not recompile.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown decoding method {method!r}; use one of {METHODS}.")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for method={method!r}; valid: "
                         f"{sorted(_OPTIONS[method])}.")
    if method == "sample" and rng is None:
        raise ValueError("method='sample' needs rng (a jax.random key).")
    if _is_static(options.get("temperature", 1.0)) and options.get("temperature", 1.0) <= 0:
        raise ValueError(f"temperature={options['temperature']} must be > 0 (use greedy).")
    if isinstance(model, nnx.Module):
        if params is not None:
            raise ValueError("Pass either a model instance or graphdef + params, not both.")
        graphdef, params = nnx.split(model)
    elif isinstance(model, nnx.GraphDef):
        if params is None:
            raise ValueError("A graphdef needs params (the model's state).")
        graphdef = model
    else:
        raise TypeError(f"generate expects a CoCa model or its GraphDef, got "
                        f"{type(model).__name__}.")
    rng = jax.random.key(0) if rng is None else rng
    if not jit:
        return _decode(nnx.merge(graphdef, params), images, rng, method, options)
    dynamic = {k: jnp.asarray(v, _DYNAMIC[k]) for k, v in options.items()
               if k in _DYNAMIC and not (k in _OFF and v == _OFF[k])}
    static = tuple(sorted((k, v) for k, v in options.items() if k not in dynamic))
    if mesh is not None:
        rules = tuple(tuple(r) for r in (parallel.DEFAULT_RULES if rules is None else rules))
    return _generate_jit(graphdef, params, images, rng, dynamic, method=method, options=static,
                         mesh=mesh, rules=None if mesh is None else rules)


__all__ = ["METHODS", "generate", "greedy", "sample", "beam_search", "top_k_filter",
           "top_p_filter", "forbid_eos"]
