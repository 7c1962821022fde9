"""Autoregressive decoding for every vlm_jax generator: CoCa captions, language-model and
Flamingo continuations (jit-compiled, batched, KV-cached).

    tokens = generate(coca, images, method='beam', beam_size=4)                   # [B, L]
    tokens = generate(lm, prompt=ids, prompt_valid=mask, max_new_tokens=20)       # [B, P + 20]
    tokens = generate(flamingo, images, prompt=ids, prompt_valid=mask, max_new_tokens=8,
                      method='sample', top_p=0.9, rng=key)
    tokens = generate(graphdef, images, params=state, method='beam')  # a train state's params

**The decoding protocol.** One set of loops serves every model (as the single ``Sampler`` of
the Flax Gemma example); a model takes part by exposing

* ``bos_id``, ``pad_id``, ``stop_ids`` (a tuple: the tokens that end a row; Flamingo's are
  ``<|endofchunk|>`` and ``eos``) and ``context_length`` (the longest sequence it can decode);
* ``encode_context(images)``: the conditioning, computed once (CoCa's image context,
  Flamingo's resampled media); absent for a text-only LM;
* ``init_cache(batch, max_length[, context])``: an empty KV cache of ``max_length`` slots
  (the context's cross-attention inputs go in it);
* ``step(tokens [B, T], cache, valid=None) -> (logits [B, T, V] float32, cache)``: ``T`` new
  tokens after the cached ones (a prompt prefill, then one token per step); ``valid`` marks the
  real tokens of left-padded prompts (positions count only valid tokens);
* ``full_logits(tokens [B, L], valid=None[, context])``: the full causal forward (no cache),
  the reference path of ``use_cache=False``;
* ``reorder_cache(cache, indices)``: the cache's batch rows gathered (beam search).

:class:`~vlm_jax.models.coca.CoCa`, :class:`~vlm_jax.models.lm.LanguageModel` and
:class:`~vlm_jax.models.flamingo.Flamingo` implement it.

**Prompts and output.** A ``prompt [B, P]`` (default: a ``bos_id`` column, CoCa's start) is
left-padded when its rows differ in length, with ``prompt_valid [B, P]`` (True at real tokens;
the last column must be valid in every row). CoCa's text positions are absolute: its prompts
are one length, without ``prompt_valid``. The output is the int32 buffer ``[B, max_length]``:
the prompt, then one generated token per position; a row stops at its first stop token (kept)
and is ``pad_id`` after it. ``max_length`` (default the model's ``context_length``) counts the
prompt; ``max_new_tokens`` is the alternative ``max_length = P + max_new_tokens``.

* **KV cache**: with ``use_cache=True`` (default) the prompt goes through :meth:`step` once
  (the prefill), then each iteration of one ``jax.lax.while_loop`` feeds the newest token only.
  ``use_cache=False`` recomputes :meth:`full_logits` over the whole ``[B, max_length]`` buffer
  at every step (the reference path; same tokens). The loop ends early once every row (or beam
  group) is finished.
* **greedy**: argmax of the next-token logits.
* **sample**: ``logits / temperature``, then top-k (keep logits >= the k-th largest; 0 = off),
  then top-p (the nucleus: the most probable tokens, in descending order, up to and including
  the first one at which the cumulative probability reaches ``top_p``; 1.0 = off), then a
  categorical draw with ``jax.random.fold_in(rng, t)`` (``t``: the buffer position of the
  last token). ``top_k=1`` is greedy.
* **beam search** (as Hugging Face's ``BeamSearchScorer``, which open_clip's CoCa uses, with
  ``num_beam_groups=1``): each step takes the top ``2 * beam_size`` continuations of the alive
  beams by summed log-probability; a stop-token continuation ranked within the first
  ``beam_size`` becomes a finished hypothesis scored ``logp / n ** length_penalty`` (``n``:
  tokens generated, the stop token included), the best ``beam_size`` other continuations stay
  alive. ``early_stopping=True``: a batch row is done once it has ``beam_size`` finished
  hypotheses (so ``beam_size=1`` is exactly greedy); ``False``: only once no alive beam can
  still beat the worst finished one (the bound at the maximum length, like HF's
  ``early_stopping='never'``). At the maximum length, unfinished rows add their alive beams
  (``n = max_length - P``; HF counts the bos there too). The best hypothesis is returned.
* ``min_length``: stop tokens are forbidden at buffer positions ``< min_length`` (open_clip's
  ``MinLengthLogitsProcessor``; open_clip's ``generate`` uses 5).

Not implemented from open_clip's ``generate``: repetition penalty, diverse beam groups
(``num_beam_groups > 1``), forcing ``eos`` at the last position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from vlm_jax import parallel

METHODS = ("greedy", "beam", "sample")
_NEG_INF = -jnp.inf


class Decodable(Protocol):
    """What :mod:`vlm_jax.decoding` asks of a model (see the module docstring)."""

    bos_id: int | None
    pad_id: int
    stop_ids: tuple[int, ...]
    context_length: int

    def init_cache(self, batch: int, max_length: int, *context: Any) -> Any: ...

    def step(self, tokens: jax.Array, cache: Any, valid: jax.Array | None = None
             ) -> tuple[jax.Array, Any]: ...

    def full_logits(self, tokens: jax.Array, valid: jax.Array | None = None,
                    *context: Any) -> jax.Array: ...

    def reorder_cache(self, cache: Any, indices: jax.Array) -> Any: ...


# -------------------------------------------------------------------------------------------
# Logit processing.
# -------------------------------------------------------------------------------------------


def _stop_mask(tokens: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
    """Boolean: where ``tokens`` is one of ``stop_ids`` (a static tuple, possibly empty)."""
    out = jnp.zeros(tokens.shape, jnp.bool_)
    for s in stop_ids:
        out = out | (tokens == s)
    return out


def forbid_eos(logits: jax.Array, forbid: jax.Array, eos_id: int | Sequence[int]) -> jax.Array:
    """``logits [..., V]`` with the ``eos_id`` entry (or entries) set to -inf where ``forbid``
    (scalar)."""
    stops = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
    col = _stop_mask(jnp.arange(logits.shape[-1]), stops)
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
# The protocol, called with or without the cache.
# -------------------------------------------------------------------------------------------


def _with_context(context) -> tuple:
    """The optional trailing context argument of ``init_cache`` / ``full_logits``."""
    return () if context is None else (context,)


def _prefill(model, context, prompt, valid, buffer, buffer_valid, length, use_cache):
    """``(cache or None, logits [B, V])``: the next-token logits after the prompt."""
    p = prompt.shape[1]
    if use_cache:
        cache = model.init_cache(prompt.shape[0], length, *_with_context(context))
        logits, cache = model.step(prompt, cache, valid)
        return cache, logits[:, -1]
    logits = model.full_logits(buffer, buffer_valid, *_with_context(context))
    return None, logits[:, p - 1]


def _advance(model, context, buffer, buffer_valid, t, cache, use_cache):
    """Logits ``[B, V]`` predicting position ``t + 1`` once ``buffer[:, t]`` is written (with the
    cache: only that token goes through the model)."""
    if use_cache:
        tok = jax.lax.dynamic_slice_in_dim(buffer, t, 1, axis=1)
        logits, cache = model.step(tok, cache)
        return logits[:, 0], cache
    logits = model.full_logits(buffer, buffer_valid, *_with_context(context))
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), cache


def _setup(model, context, prompt, prompt_valid, *, max_length, max_new_tokens, bos_id,
           eos_id, pad_id):
    """Checks the inputs; returns ``(prompt int32 [B, P], valid or None, length, stop_ids,
    pad_id)``."""
    needs_context = hasattr(model, "encode_context")
    if needs_context and context is None:
        raise ValueError(f"{type(model).__name__} decodes from images: pass images to generate "
                         "(or the encode_context output to greedy / sample / beam_search).")
    if not needs_context and context is not None:
        raise ValueError(f"{type(model).__name__} is not conditioned on images: pass no images "
                         "or context.")
    stops = getattr(model, "stop_ids", ()) if eos_id is None else (
        (int(eos_id),) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id))
    pad_id = int(getattr(model, "pad_id", 0) if pad_id is None else pad_id)
    if prompt is None:
        bos_id = getattr(model, "bos_id", None) if bos_id is None else bos_id
        if bos_id is None:
            raise ValueError("Decoding without a prompt starts from bos_id: set it in the model "
                             "config (model.text.bos_id / model.bos_id) or pass a prompt.")
        if context is None:
            raise ValueError("Decoding needs a prompt or an image context to take the batch "
                             "size from.")
        b = jax.tree.leaves(context)[0].shape[0]
        prompt = jnp.full((b, 1), int(bos_id), jnp.int32)
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer tokens [batch, length], got shape "
                         f"{tuple(prompt.shape)} of {prompt.dtype}.")
    prompt = prompt.astype(jnp.int32)
    if prompt_valid is not None:
        if tuple(prompt_valid.shape) != tuple(prompt.shape):
            raise ValueError(f"prompt_valid of shape {tuple(prompt_valid.shape)} does not match "
                             f"the prompt's {tuple(prompt.shape)}.")
        prompt_valid = jnp.asarray(prompt_valid).astype(jnp.bool_)
    p = prompt.shape[1]
    if max_new_tokens is not None:
        if max_length is not None:
            raise ValueError("Give max_length (the whole sequence) or max_new_tokens, not both.")
        length = p + int(max_new_tokens)
    else:
        length = model.context_length if max_length is None else int(max_length)
    if not p < length <= model.context_length:
        raise ValueError(f"max_length={length} must be in [prompt length + 1 = {p + 1}, "
                         f"context_length={model.context_length}] (shorten the prompt or "
                         "generate fewer tokens).")
    return prompt, prompt_valid, length, stops, pad_id


def _buffers(prompt, valid, length, pad_id):
    """The token buffer ``[B, length]`` (prompt first, pad after) and its validity (None when
    the prompt has no padding)."""
    b, p = prompt.shape
    buffer = jnp.full((b, length), pad_id, jnp.int32).at[:, :p].set(prompt)
    buffer_valid = None if valid is None else jnp.ones((b, length), jnp.bool_).at[:, :p].set(
        valid)
    return buffer, buffer_valid


# -------------------------------------------------------------------------------------------
# Greedy and sampling.
# -------------------------------------------------------------------------------------------


def _token_loop(model, context, prompt, valid, choose: Callable, *, length, min_length, stops,
                pad_id, use_cache):
    # The loop carries the next-token logits: the prefill's feed the first iteration, and each
    # iteration chooses a token, then runs it through the model. The last iteration's step is
    # not used (one step per decode more than strictly needed) but the prompt goes through the
    # model in one call and every later step is the same one-token step.
    b, p = prompt.shape
    buffer, buffer_valid = _buffers(prompt, valid, length, pad_id)
    cache, logits = _prefill(model, context, prompt, valid, buffer, buffer_valid, length,
                             use_cache)
    graphdef, params = nnx.split(model)

    def cond(state):
        t, _, done = state[:3]
        return (t < length - 1) & ~jnp.all(done)

    def body(state):
        t, buffer, done, logits, cache, params = state
        logits = forbid_eos(logits.astype(jnp.float32), t + 1 < min_length, stops)
        nxt = jnp.where(done, pad_id, choose(logits, t).astype(jnp.int32))
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, nxt[:, None], t + 1, axis=1)
        done = done | _stop_mask(nxt, stops)
        m = nnx.merge(graphdef, params)
        logits, cache = _advance(m, context, buffer, buffer_valid, t + 1, cache, use_cache)
        return t + 1, buffer, done, logits, cache, params

    state = (jnp.asarray(p - 1, jnp.int32), buffer, jnp.zeros((b,), jnp.bool_), logits, cache,
             params)
    return jax.lax.while_loop(cond, body, state)[1]


def greedy(model: Decodable, context: Any = None, *, prompt: jax.Array | None = None,
           prompt_valid: jax.Array | None = None, max_length: int | None = None,
           max_new_tokens: int | None = None, min_length: int = 0, bos_id: int | None = None,
           eos_id: int | Sequence[int] | None = None, pad_id: int | None = None,
           use_cache: bool = True) -> jax.Array:
    """Greedy decoding -> int32 tokens ``[B, max_length]`` (prompt first; see the module doc).

    ``model``: a (merged) model implementing :class:`Decodable`; ``context``: its
    ``encode_context(images)`` (None for a text-only LM). Call under ``jax.jit`` (or use
    :func:`generate`).
    """
    prompt, valid, length, stops, pad_id = _setup(
        model, context, prompt, prompt_valid, max_length=max_length,
        max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    return _token_loop(model, context, prompt, valid,
                       lambda logits, t: jnp.argmax(logits, axis=-1), length=length,
                       min_length=min_length, stops=stops, pad_id=pad_id, use_cache=use_cache)


def sample(model: Decodable, context: Any = None, rng: jax.Array | None = None, *,
           prompt: jax.Array | None = None, prompt_valid: jax.Array | None = None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           max_length: int | None = None, max_new_tokens: int | None = None,
           min_length: int = 0, bos_id: int | None = None,
           eos_id: int | Sequence[int] | None = None, pad_id: int | None = None,
           use_cache: bool = True) -> jax.Array:
    """Sampling with temperature, top-k and nucleus (top-p) filtering -> int32
    ``[B, max_length]``.

    ``temperature``, ``top_k``, ``top_p``: Python numbers, traced scalars or per-row ``[B]``
    arrays. The draw producing position ``t + 1`` uses ``jax.random.fold_in(rng, t)``.
    """
    if rng is None:
        raise ValueError("sample needs rng (a jax.random key).")
    if _is_static(temperature) and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy for 0).")
    prompt, valid, length, stops, pad_id = _setup(
        model, context, prompt, prompt_valid, max_length=max_length,
        max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    temp = temperature if _is_static(temperature) else _per_row(temperature, jnp.float32, 2)

    def choose(logits, t):
        logits = top_p_filter(top_k_filter(logits / temp, top_k), top_p)
        return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)

    return _token_loop(model, context, prompt, valid, choose, length=length,
                       min_length=min_length, stops=stops, pad_id=pad_id, use_cache=use_cache)


# -------------------------------------------------------------------------------------------
# Beam search.
# -------------------------------------------------------------------------------------------


def beam_search(model: Decodable, context: Any = None, *, prompt: jax.Array | None = None,
                prompt_valid: jax.Array | None = None, beam_size: int = 4,
                length_penalty: float = 1.0, early_stopping: bool = True,
                max_length: int | None = None, max_new_tokens: int | None = None,
                min_length: int = 0, bos_id: int | None = None,
                eos_id: int | Sequence[int] | None = None, pad_id: int | None = None,
                use_cache: bool = True) -> tuple[jax.Array, jax.Array]:
    """Beam search (see the module docstring) -> ``(tokens int32 [B, max_length], scores
    float32 [B])``; the score is the length-normalised log-probability of the returned
    hypothesis."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1.")
    prompt, valid, length, stops, pad_id = _setup(
        model, context, prompt, prompt_valid, max_length=max_length,
        max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    b, p = prompt.shape
    k = int(beam_size)
    alpha = length_penalty
    rows = jnp.repeat(jnp.arange(b), k)  # row b * k + j: beam j of batch row b
    buffer, buffer_valid = _buffers(prompt, valid, length, pad_id)
    # The prompt goes through the model once per batch row; its cache is then copied per beam.
    cache, logits = _prefill(model, context, prompt, valid, buffer, buffer_valid, length,
                             use_cache)
    logits = jnp.take(logits, rows, axis=0)
    if use_cache:
        cache = model.reorder_cache(cache, rows)
        ctx = None
    else:
        ctx = jax.tree.map(lambda a: jnp.take(a, rows, axis=0), context)
    valid_k = None if buffer_valid is None else jnp.take(buffer_valid, rows, axis=0)
    seqs = jnp.take(buffer, rows, axis=0).reshape(b, k, length)
    first = jnp.where(jnp.arange(k) == 0, 0.0, _NEG_INF).astype(jnp.float32)
    alive_logp = jnp.tile(first[None], (b, 1))
    fin_seqs = seqs
    fin_scores = jnp.full((b, k), _NEG_INF, jnp.float32)
    done = jnp.zeros((b,), jnp.bool_)
    graphdef, params = nnx.split(model)

    def norm(n):
        return jnp.power(jnp.asarray(n, jnp.float32), alpha)

    def cond(state):
        t, done = state[0], state[5]
        return (t < length - 1) & ~jnp.all(done)

    def body(state):
        t, seqs, alive_logp, fin_seqs, fin_scores, done, logits, cache, params = state
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = forbid_eos(logp, t + 1 < min_length, stops)
        vocab = logp.shape[-1]
        cand = (alive_logp[:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
        top_scores, top_idx = jax.lax.top_k(cand, 2 * k)  # [B, 2K], sorted
        beam, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand_seqs = jnp.take_along_axis(seqs, beam[:, :, None], axis=1)
        cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, tok[:, :, None], t + 1, 2)
        is_eos = _stop_mask(tok, stops)
        n = t + 2 - p  # tokens generated, this one included
        # Finished hypotheses: stop continuations ranked within the first K (HF's rule).
        new_fin = (is_eos & (jnp.arange(2 * k) < k)[None] & jnp.isfinite(top_scores)
                   & ~done[:, None])
        new_scores = jnp.where(new_fin, top_scores / norm(n), _NEG_INF)
        all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
        fin_scores, pick = jax.lax.top_k(all_scores, k)
        fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, cand_seqs], axis=1),
                                       pick[:, :, None], axis=1)
        # Alive beams: the best K non-stop continuations.
        alive_logp, pick = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, top_scores), k)
        seqs = jnp.take_along_axis(cand_seqs, pick[:, :, None], axis=1)
        m = nnx.merge(graphdef, params)
        if use_cache:
            src = jnp.take_along_axis(beam, pick, axis=1) + (jnp.arange(b) * k)[:, None]
            cache = m.reorder_cache(cache, src.reshape(-1))
        logits, cache = _advance(m, ctx, seqs.reshape(b * k, length), valid_k, t + 1, cache,
                                 use_cache)
        full = jnp.sum(jnp.isfinite(fin_scores), axis=1) >= k
        if early_stopping:
            now_done = full
        else:
            bound_len = jnp.where(jnp.asarray(alpha) > 0, length - p, n)
            now_done = full & (fin_scores[:, -1] >= alive_logp[:, 0] / norm(bound_len))
        return (t + 1, seqs, alive_logp, fin_seqs, fin_scores, done | now_done, logits, cache,
                params)

    state = (jnp.asarray(p - 1, jnp.int32), seqs, alive_logp, fin_seqs, fin_scores, done,
             logits, cache, params)
    _, seqs, alive_logp, fin_seqs, fin_scores, done, *_ = jax.lax.while_loop(cond, body, state)
    # Rows not done reached the maximum length: their alive beams compete too.
    alive_scores = jnp.where(done[:, None], _NEG_INF, alive_logp / norm(length - p))
    scores = jnp.concatenate([fin_scores, alive_scores], axis=1)
    best = jnp.argmax(scores, axis=1)
    tokens = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1),
                                 best[:, None, None], axis=1)[:, 0]
    return tokens, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


# -------------------------------------------------------------------------------------------
# Entry point.
# -------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "options", "mesh", "rules"))
def _generate_jit(graphdef, state, images, prompt, prompt_valid, rng, dynamic, *, method,
                  options, mesh, rules):
    with parallel.sharding_context(mesh, rules):
        model = nnx.merge(graphdef, state)
        return _decode(model, images, prompt, prompt_valid, rng, method,
                       {**dict(options), **dynamic})


def _decode(model, images, prompt, prompt_valid, rng, method, options):
    if images is not None and not hasattr(model, "encode_context"):
        raise ValueError(f"{type(model).__name__} is not conditioned on images: pass no images.")
    context = None if images is None else model.encode_context(images)
    kw = dict(prompt=prompt, prompt_valid=prompt_valid, **options)
    if method == "greedy":
        return greedy(model, context, **kw)
    if method == "sample":
        return sample(model, context, rng, **kw)
    return beam_search(model, context, **kw)[0]


# Options passed to the compiled decode as traced values (no recompilation when they change);
# top_k / top_p only when they are on (off = no filtering code at all).
_DYNAMIC = {"temperature": jnp.float32, "length_penalty": jnp.float32, "min_length": jnp.int32,
            "top_k": jnp.int32, "top_p": jnp.float32}
_OFF = {"top_k": 0, "top_p": 1.0}


_COMMON = ("max_length", "max_new_tokens", "min_length", "bos_id", "eos_id", "pad_id",
           "use_cache")
_OPTIONS = {"greedy": _COMMON,
            "sample": _COMMON + ("temperature", "top_k", "top_p"),
            "beam": _COMMON + ("beam_size", "length_penalty", "early_stopping")}


def _check_left_padded(prompt_valid) -> None:
    """A concrete ``prompt_valid`` must have its last column valid in every row."""
    if prompt_valid is None or isinstance(prompt_valid, jax.core.Tracer) or (
            isinstance(prompt_valid, jax.Array) and not prompt_valid.is_fully_addressable):
        return  # traced, or rows on other hosts: the caller's responsibility
    last = jax.device_get(prompt_valid)[:, -1]
    if not last.all():
        raise ValueError("prompt_valid: prompts must be left-padded (the last column valid in "
                         f"every row); rows {[int(i) for i in (~last.astype(bool)).nonzero()[0]]}"
                         " end with padding.")


def generate(model: Any, images: jax.Array | None = None, *, prompt: jax.Array | None = None,
             prompt_valid: jax.Array | None = None, params: Any = None,
             method: str = "greedy", rng: jax.Array | None = None, jit: bool = True,
             mesh: Mesh | None = None, rules: Any = None, **options: Any) -> jax.Array:
    """Decodes int32 tokens ``[B, max_length]``: the prompt (default one ``bos_id`` column),
    then the generated tokens, ``pad_id`` after each row's first stop token.

    Args:
      model: a model implementing :class:`Decodable` (CoCa, LanguageModel, Flamingo), or its
        ``nnx.GraphDef`` with ``params`` (an ``nnx.State`` or the pure dict of it, e.g. a train
        state's ``params``).
      images: the conditioning images (CoCa ``[B, H, W, 3]``; Flamingo ``[B, T, S, S, 3]``, one
        per ``<image>`` of the prompt); None for a text-only LM.
      prompt, prompt_valid: ``[B, P]`` tokens, left-padded, and their validity mask (see the
        module docstring).
      method: ``'greedy'``, ``'beam'`` or ``'sample'``.
      rng: PRNG key, required for ``'sample'``.
      jit: compile the whole decode (default; once per shape and static options). With
        ``jit=False`` the call is traced inline, for use inside the caller's own ``jax.jit``
        (and its :func:`parallel.sharding_context`).
      mesh, rules: with ``jit=True``, trace under ``parallel.sharding_context(mesh, rules)``
        (activation constraints; default rules :data:`parallel.DEFAULT_RULES`). Shard the
        params (``parallel.state_shardings``) and inputs (batch axes) before the call.
      options: ``max_length`` (default the model's ``context_length``) or ``max_new_tokens``,
        ``min_length`` (0), ``bos_id`` / ``eos_id`` (an id or a tuple of stop ids) / ``pad_id``
        (default the model's), ``use_cache`` (True); for ``'sample'``: ``temperature`` (1.0),
        ``top_k`` (0 = off), ``top_p`` (1.0 = off); for ``'beam'``: ``beam_size`` (4),
        ``length_penalty`` (1.0), ``early_stopping`` (True). ``temperature``,
        ``length_penalty``, ``min_length`` and (when on) ``top_k`` / ``top_p`` are traced:
        changing their values does not recompile.
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
    if isinstance(options.get("eos_id"), (list, tuple)):
        options["eos_id"] = tuple(int(e) for e in options["eos_id"])  # hashable: static
    _check_left_padded(prompt_valid)
    if isinstance(model, nnx.Module):
        if params is not None:
            raise ValueError("Pass either a model instance or graphdef + params, not both.")
        graphdef, params = nnx.split(model)
    elif isinstance(model, nnx.GraphDef):
        if params is None:
            raise ValueError("A graphdef needs params (the model's state).")
        graphdef = model
    else:
        raise TypeError(f"generate expects a model (CoCa, LanguageModel, Flamingo) or its "
                        f"GraphDef, got {type(model).__name__}.")
    rng = jax.random.key(0) if rng is None else rng
    if not jit:
        return _decode(nnx.merge(graphdef, params), images, prompt, prompt_valid, rng, method,
                       options)
    dynamic = {k: jnp.asarray(v, _DYNAMIC[k]) for k, v in options.items()
               if k in _DYNAMIC and not (k in _OFF and _is_static(v) and v == _OFF[k])}
    static = tuple(sorted((k, v) for k, v in options.items() if k not in dynamic))
    if mesh is not None:
        rules = tuple(tuple(r) for r in (parallel.DEFAULT_RULES if rules is None else rules))
    return _generate_jit(graphdef, params, images, prompt, prompt_valid, rng, dynamic,
                         method=method, options=static, mesh=mesh,
                         rules=None if mesh is None else rules)


__all__ = ["METHODS", "Decodable", "generate", "greedy", "sample", "beam_search",
           "top_k_filter", "top_p_filter", "forbid_eos"]
