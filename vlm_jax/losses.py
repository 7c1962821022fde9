"""Contrastive image-text losses: dense references and batch-sharded ``shard_map`` versions.

Notation used throughout: the global batch has ``B`` image/text pairs with embeddings
``I, T`` of shape ``[B, D]`` (normally L2-normalised by the model); ``s`` is the *multiplicative*
logit scale (CLIP's ``exp(t)``, ``1/0.07 ~ 14.3`` at init and clamped at 100 by open_clip -- the
caller applies ``exp`` and the clamp); the logits are ``L = s * I @ T.T``, an ``[B, B]`` matrix
whose diagonal holds the positive pairs.

* Softmax contrastive (CLIP, InfoNCE)::

      loss = ( CE(L, arange(B)) + CE(L.T, arange(B)) ) / 2
      CE(L, y) = mean_r [ logsumexp_c L[r, c] - L[r, y_r] ]

* Sigmoid (SigLIP)::

      loss = -1/B * sum_{r,c} log_sigmoid(z_rc * (s * I_r . T_c + b)),  z = 2 * eye(B) - 1

The batch-sharded functions take *global* ``jax.Array``s whose leading dimension is split over
the batch axes ``('slice', 'data', 'fsdp')`` of the mesh (``n`` shards of ``b = B / n`` rows;
the ``tensor`` axis only holds replicas and does not change the result). Inside ``shard_map``
each shard only ever builds ``[b, B]`` (``'gather'``) or ``[b, b]`` (``'ring'``,
``'ring_recompute'``) blocks of logits (``'chunked'``: ``[b, chunk]``); the global ``[B, B]``
matrix is never materialised on any device. Every function
computes in float32 whatever the input dtype and returns ``(loss, metrics)`` where ``metrics``
holds the in-batch top-1 retrieval accuracies ``'i2t_acc'`` and ``'t2i_acc'``.

Variants are looked up by name in a registry (:data:`CONTRASTIVE_VARIANTS`: ``'gather'``,
``'ring'``, ``'chunked'``, ``'ring_recompute'``; :data:`SIGMOID_VARIANTS`: ``'ring'``,
``'gather'``, ``'ring_recompute'``), so further algorithms can be added next to the existing
ones without touching the public functions.
``'chunked'`` builds only ``[b, chunk]`` blocks of logits, in the forward and in the backward
pass (a ``jax.custom_vjp`` with an online log-sum-exp): its logit memory grows with the local
batch, not the global one. ``'ring_recompute'`` is ``'ring'`` as a ``jax.custom_vjp`` whose
backward pass sends the text blocks around the ring again instead of keeping the ``n - 1``
received ones: O(b x D) memory per device instead of O(B x D), for twice the text traffic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from vlm_jax.parallel import BATCH_AXES

__all__ = [
    "dense_contrastive_loss",
    "contrastive_loss",
    "dense_sigmoid_loss",
    "sigmoid_loss",
    "CONTRASTIVE_VARIANTS",
    "SIGMOID_VARIANTS",
]

Metrics = dict[str, jax.Array]

# -------------------------------------------------------------------------------------------
# Validation.
# -------------------------------------------------------------------------------------------


def _check_pair(fn: str, image_emb: Any, text_emb: Any) -> tuple[int, int]:
    """Checks ``image_emb``/``text_emb`` are both ``[B, D]`` with the same shape; returns (B, D)."""
    ishape, tshape = tuple(jnp.shape(image_emb)), tuple(jnp.shape(text_emb))
    if len(ishape) != 2 or len(tshape) != 2:
        raise ValueError(
            f"{fn}: image_emb and text_emb must be 2-D [batch, dim] arrays, got image_emb shape "
            f"{ishape} and text_emb shape {tshape}.")
    if ishape != tshape:
        raise ValueError(
            f"{fn}: image_emb shape {ishape} and text_emb shape {tshape} differ; both must be "
            "[batch, dim] with one text per image (same batch size and embedding dim).")
    if ishape[0] == 0:
        raise ValueError(f"{fn}: empty batch (image_emb shape {ishape}).")
    return ishape


def _check_scalar(fn: str, name: str, value: Any) -> None:
    shape = tuple(jnp.shape(value))
    if math.prod(shape) != 1:
        raise ValueError(f"{fn}: {name} must be a scalar (the multiplicative logit scale/bias), "
                         f"got shape {shape}.")


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The batch axes of ``mesh`` in linearisation order (axes absent from the mesh are skipped)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def _check_mesh(fn: str, mesh: Any, shape: tuple[int, int], text_shape: tuple[int, int]) -> int:
    """Checks the global batch splits evenly over the batch shards; returns their number."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"{fn}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    n = math.prod(mesh.shape[a] for a in _batch_axes(mesh))
    if shape[0] % n:
        raise ValueError(
            f"{fn}: global batch {shape[0]} (image_emb shape {shape}, text_emb shape "
            f"{text_shape}) is not divisible by the {n} batch shards of mesh {dict(mesh.shape)} "
            f"(product of axes {_batch_axes(mesh)}); use a batch size that is a multiple of {n}.")
    return n


def _lookup(fn: str, registry: dict[str, Any], variant: str, hint: str = "") -> Any:
    try:
        return registry[variant]
    except (KeyError, TypeError):
        raise ValueError(f"{fn}: unknown variant {variant!r}; valid variants are "
                         f"{sorted(registry)}.{hint}") from None


# -------------------------------------------------------------------------------------------
# Dense single-device references.
# -------------------------------------------------------------------------------------------


def _top1_acc(logits: jax.Array, axis: int) -> jax.Array:
    """Fraction of rows (axis=1) or columns (axis=0) whose argmax is the diagonal element."""
    pred = jnp.argmax(logits, axis=axis)
    return jnp.mean((pred == jnp.arange(pred.shape[0])).astype(jnp.float32))


def dense_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array,
                           logit_scale: jax.Array | float) -> tuple[jax.Array, Metrics]:
    """CLIP's symmetric softmax contrastive loss on one device (the reference implementation).

    Implements the CLIP paper's pseudo-code in float32::

        logits = logit_scale * image_emb @ text_emb.T          # [B, B]
        labels = arange(B)
        loss   = (CE(logits, labels) + CE(logits.T, labels)) / 2

    where ``CE`` is the mean over rows of ``logsumexp(row) - row[label]``. ``logit_scale`` is the
    multiplicative scale (``exp`` of the learned temperature parameter), not its log.

    Returns ``(loss, {'i2t_acc', 't2i_acc'})``: the fraction of images whose highest-scoring text
    in the batch is their own caption, and vice versa. This materialises the full ``[B, B]``
    matrix; use :func:`contrastive_loss` for batches sharded over a mesh.
    """
    _check_pair("dense_contrastive_loss", image_emb, text_emb)
    _check_scalar("dense_contrastive_loss", "logit_scale", logit_scale)
    img = jnp.asarray(image_emb, jnp.float32)
    txt = jnp.asarray(text_emb, jnp.float32)
    scale = jnp.reshape(jnp.asarray(logit_scale, jnp.float32), ())
    logits = scale * (img @ txt.T)
    labels = jnp.arange(logits.shape[0])

    def ce(lg):
        picked = jnp.take_along_axis(lg, labels[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(lg, axis=1) - picked)

    loss = (ce(logits) + ce(logits.T)) / 2
    return loss, {"i2t_acc": _top1_acc(logits, 1), "t2i_acc": _top1_acc(logits, 0)}


def dense_sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float,
                       logit_bias: jax.Array | float) -> tuple[jax.Array, Metrics]:
    """SigLIP's pairwise sigmoid loss on one device (the reference implementation).

    In float32, as in big_vision's ``siglip`` trainer and open_clip's ``SigLipLoss``::

        logits = logit_scale * image_emb @ text_emb.T + logit_bias   # [B, B]
        z      = 2 * eye(B) - 1                                      # +1 positives, -1 negatives
        loss   = -sum(log_sigmoid(z * logits)) / B

    i.e. every one of the ``B^2`` pairs is an independent binary classification, summed over texts
    and averaged over images. ``logit_scale`` is multiplicative (``exp`` of the parameter,
    SigLIP initialises it to 10) and ``logit_bias`` additive (SigLIP init -10).
    Returns ``(loss, {'i2t_acc', 't2i_acc'})`` as :func:`dense_contrastive_loss`.
    """
    _check_pair("dense_sigmoid_loss", image_emb, text_emb)
    _check_scalar("dense_sigmoid_loss", "logit_scale", logit_scale)
    _check_scalar("dense_sigmoid_loss", "logit_bias", logit_bias)
    img = jnp.asarray(image_emb, jnp.float32)
    txt = jnp.asarray(text_emb, jnp.float32)
    scale = jnp.reshape(jnp.asarray(logit_scale, jnp.float32), ())
    bias = jnp.reshape(jnp.asarray(logit_bias, jnp.float32), ())
    logits = scale * (img @ txt.T) + bias
    z = 2 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1
    loss = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]
    return loss, {"i2t_acc": _top1_acc(logits, 1), "t2i_acc": _top1_acc(logits, 0)}


# -------------------------------------------------------------------------------------------
# Per-shard machinery.
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardContext:
    """What a per-shard variant body knows about its place in the batch.

    ``axes`` are the mesh batch axes (in the order in which ``all_gather``/``axis_index``
    linearise them, slowest first), ``n`` the number of batch shards, ``b`` the local batch size.
    ``index`` (a traced int) is this shard's position, so its rows are global rows
    ``index * b + arange(b)``.
    """

    axes: tuple[str, ...]
    n: int
    b: int

    @property
    def index(self) -> jax.Array:
        if not self.axes:
            return jnp.zeros((), jnp.int32)
        return jax.lax.axis_index(self.axes)

    def row_ids(self) -> jax.Array:
        """Global row indices of this shard's examples (= the labels of its rows)."""
        return self.index * self.b + jnp.arange(self.b)

    def all_gather(self, x: jax.Array) -> jax.Array:
        """``[b, ...] -> [B, ...]`` in shard order; differentiable (transpose: reduce-scatter)."""
        if not self.axes:
            return x
        return jax.lax.all_gather(x, self.axes, axis=0, tiled=True)

    def psum(self, x: Any) -> Any:
        return jax.lax.psum(x, self.axes) if self.axes else x

    def shift(self, x: Any) -> Any:
        """Sends ``x`` from shard ``i`` to shard ``(i + 1) % n`` (every leaf of a pytree)."""
        if self.n == 1:
            return x
        perm = [(j, (j + 1) % self.n) for j in range(self.n)]
        return jax.tree.map(lambda a: jax.lax.ppermute(a, self.axes, perm), x)


# A variant body maps this shard's float32 (image [b, D], text [b, D], scalars..., ctx) to a dict
# of *local sums* ``{'loss': ..., 'i2t_correct': ..., 't2i_correct': ...}``; the public function
# psums them over the batch axes and divides by the global batch size.
VariantBody = Callable[..., dict[str, jax.Array]]

CONTRASTIVE_VARIANTS: dict[str, VariantBody] = {}
SIGMOID_VARIANTS: dict[str, VariantBody] = {}


def _register(registry: dict[str, VariantBody], name: str) -> Callable[[VariantBody], VariantBody]:
    def deco(fn: VariantBody) -> VariantBody:
        registry[name] = fn
        return fn
    return deco


def _run_sharded(body: VariantBody, mesh: Mesh, image_emb: jax.Array,
                 text_emb: jax.Array, scalars: tuple[jax.Array, ...],
                 combine: Callable[[dict[str, jax.Array], int], jax.Array]
                 ) -> tuple[jax.Array, Metrics]:
    """Runs ``body`` under ``shard_map`` and turns its psummed local sums into (loss, metrics)."""
    axes = _batch_axes(mesh)
    bsz = image_emb.shape[0]
    n = math.prod(mesh.shape[a] for a in axes)
    ctx = ShardContext(axes=axes, n=n, b=bsz // n)
    batch = P(axes if axes else None, None)

    def per_shard(img, txt, *sc):
        # Collectives move the input dtype (e.g. bf16 halves the gather traffic); math in f32.
        sums = body(img, txt, *(jnp.reshape(s.astype(jnp.float32), ()) for s in sc), ctx)
        sums = ctx.psum(sums)
        metrics = {"i2t_acc": sums["i2t_correct"] / bsz, "t2i_acc": sums["t2i_correct"] / bsz}
        return combine(sums, bsz), metrics

    sharded = jax.shard_map(per_shard, mesh=mesh,
                            in_specs=(batch, batch) + (P(),) * len(scalars), out_specs=P())
    return sharded(image_emb, text_emb, *scalars)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _nll_rows(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sum over rows of ``logsumexp(row) - row[label]`` (softmax cross-entropy, summed)."""
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked)


def _correct_rows(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.sum((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))


# -------------------------------------------------------------------------------------------
# Softmax contrastive: 'gather'.
# -------------------------------------------------------------------------------------------


@_register(CONTRASTIVE_VARIANTS, "gather")
def _contrastive_gather(img: jax.Array, txt: jax.Array, scale: jax.Array,
                        ctx: ShardContext) -> dict[str, jax.Array]:
    """open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)`` on one batch shard.

    Shard ``i`` holds rows ``R_i = i*b + arange(b)``. It all-gathers both modalities (``[B, D]``
    each) and computes only its own rows of the two logit matrices::

        L_i2t = s * I[R_i] @ T_all.T     # [b, B]  rows of L
        L_t2i = s * T[R_i] @ I_all.T     # [b, B]  rows of L.T (= columns R_i of L)

    The label of local row ``r`` is its global index ``i*b + r``: ``jax.lax.axis_index`` over the
    batch-axes tuple linearises the shard position in the same (row-major, first axis slowest)
    order in which ``all_gather(..., tiled=True)`` concatenates the shards, so that column of
    ``T_all``/``I_all`` is exactly this row's own pair.
    """
    all_txt = _f32(ctx.all_gather(txt))
    all_img = _f32(ctx.all_gather(img))
    img, txt = _f32(img), _f32(txt)
    labels = ctx.row_ids()
    l_i2t = scale * (img @ all_txt.T)
    l_t2i = scale * (txt @ all_img.T)
    return {
        "i2t_nll": _nll_rows(l_i2t, labels),
        "t2i_nll": _nll_rows(l_t2i, labels),
        "i2t_correct": _correct_rows(l_i2t, labels),
        "t2i_correct": _correct_rows(l_t2i, labels),
    }


# -------------------------------------------------------------------------------------------
# Ring passes (shared by the softmax and sigmoid 'ring' variants).
# -------------------------------------------------------------------------------------------

_NEG_INF = -jnp.inf


def _top1_init(b: int) -> tuple[jax.Array, jax.Array]:
    return jnp.full((b,), _NEG_INF, jnp.float32), jnp.zeros((b,), jnp.int32)


def _top1_update(state, block: jax.Array, ids: jax.Array, axis: int):
    """Running argmax along ``axis`` of a stream of blocks; ties go to the smaller global index
    (as ``jnp.argmax`` over the full row would)."""
    best, best_id = state
    block = jax.lax.stop_gradient(block)
    val = jnp.max(block, axis=axis)
    idx = ids[jnp.argmax(block, axis=axis)].astype(jnp.int32)
    take = (val > best) | ((val == best) & (idx < best_id))
    return jnp.where(take, val, best), jnp.where(take, idx, best_id)


def _lse_init(b: int) -> tuple[jax.Array, jax.Array]:
    return jnp.full((b,), _NEG_INF, jnp.float32), jnp.zeros((b,), jnp.float32)


def _lse_update(state, block: jax.Array, axis: int):
    """Online log-sum-exp along ``axis``: state ``(m, s)`` with ``lse = m + log(s)``.

    ``m`` (the running max) is under ``stop_gradient``: ``m + log(sum exp(x - m))`` equals
    ``logsumexp(x)`` for *any* constant ``m``, so treating it as a constant leaves the value and
    the gradient (``softmax(x)``) exact while keeping ``exp`` in range.
    """
    m, s = state
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(block, axis=axis)))
    expand = (lambda v: v[:, None]) if axis == 1 else (lambda v: v[None, :])
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(block - expand(m_new)), axis=axis)
    return m_new, s


def _lse_final(state) -> jax.Array:
    m, s = state
    return m + jnp.log(s)


def _ring(img: jax.Array, txt: jax.Array, ctx: ShardContext, visit, row_state, col_state):
    """Streams every text block past this shard's image block, ``n`` blocks in ``n - 1`` hops.

    At hop ``k`` shard ``i`` holds the text block of shard ``src = (i - k) % n`` together with
    ``col_state`` -- per-column accumulators that travel *with* that text block -- and calls
    ``visit(row_state, col_state, txt_block, src, first) -> (row_state, col_state)`` (``first``
    is a Python bool, True only for the local block ``src == i`` at hop 0). After the last
    block one more hop returns every ``col_state`` to the shard owning its texts. The block
    computation of each hop is rematerialised in the backward pass (``jax.checkpoint``), so the
    scan saves the received ``[b, D]`` text blocks and ``[b]`` accumulators, never the ``[b, b]``
    logit blocks (the ``ppermute`` is not recomputed: no extra communication); the gradient of ``ppermute`` is the reverse
    ``ppermute``, so text gradients flow back around the ring to their owners.
    """
    row_state, col_state = visit(row_state, col_state, txt, ctx.index, True)
    if ctx.n == 1:
        return row_state, col_state

    # Rematerialise the block computation, not the hop: recomputing the ppermute in the backward
    # pass would double the communication, while keeping its [b, D] output costs what the
    # all-gather variant keeps anyway.
    visit_remat = jax.checkpoint(lambda row, col, t, src: visit(row, col, t, src, False))

    def hop(carry, _):
        t, col, row, src = carry
        t, col = ctx.shift((t, col))
        src = (src - 1) % ctx.n
        row, col = visit_remat(row, col, t, src)
        return (t, col, row, src), None

    carry = (txt, col_state, row_state, ctx.index)
    (_, col_state, row_state, _), _ = jax.lax.scan(hop, carry, None, length=ctx.n - 1)
    return row_state, ctx.shift(col_state)


def _softmax_ring_pass(img: jax.Array, txt: jax.Array, scale: jax.Array, ctx: ShardContext):
    """The forward ring of the softmax loss: ``(row, col)`` states, each ``((m, s), top1)``.

    ``row`` holds the online log-sum-exp ``(m, s)`` and the running argmax of this shard's image
    rows over all ``B`` texts; ``col`` those of this shard's *text columns* over all ``B``
    images (they travelled with the text block and are home again). Shared by ``'ring'``
    (differentiated by JAX) and ``'ring_recompute'`` (the forward rule of its custom VJP)."""
    b = ctx.b
    local = jnp.arange(b)

    def visit(row, col, t, src, _first):
        block = scale * (img @ _f32(t).T)
        row_lse, row_top = row
        col_lse, col_top = col
        row = (_lse_update(row_lse, block, 1), _top1_update(row_top, block, src * b + local, 1))
        col = (_lse_update(col_lse, block, 0),
               _top1_update(col_top, block, ctx.index * b + local, 0))
        return row, col

    init = lambda: (_lse_init(b), _top1_init(b))  # noqa: E731
    return _ring(img, txt, ctx, visit, init(), init())


@_register(CONTRASTIVE_VARIANTS, "ring")
def _contrastive_ring(img: jax.Array, txt: jax.Array, scale: jax.Array,
                      ctx: ShardContext) -> dict[str, jax.Array]:
    """Softmax contrastive loss by passing text blocks around the ring of batch shards.

    Shard ``i`` computes the ``[b, b]`` block ``s * I_i @ T_j.T`` for every ``j`` as the text
    blocks ``T_j`` travel around the ring (``ppermute`` to the next shard). The block contributes
    to the image->text log-sum-exp of rows ``R_i`` (accumulated locally) and to the text->image
    log-sum-exp of *columns* ``R_j``: those column accumulators travel with ``T_j`` and are
    sent home after the last hop. So one ``[b, b]`` matmul per hop serves both directions. The
    positive logits are the diagonal of the local block ``s * I_i @ T_i.T``.
    Peak logit memory ``b x b`` instead of ``b x B``; forward communication ``(n - 1) * b * D``
    text values plus ``4 * n * b`` accumulator floats per shard (the ``'gather'`` variant moves
    both modalities, ``2 * (n - 1) * b * D``), in ``n`` hops that XLA can overlap with the
    matmuls.
    """
    img = _f32(img)
    row, col = _softmax_ring_pass(img, txt, scale, ctx)
    positives = scale * jnp.sum(img * _f32(txt), axis=1)
    labels = ctx.row_ids()
    return {
        "i2t_nll": jnp.sum(_lse_final(row[0]) - positives),
        "t2i_nll": jnp.sum(_lse_final(col[0]) - positives),
        "i2t_correct": jnp.sum((row[1][1] == labels).astype(jnp.float32)),
        "t2i_correct": jnp.sum((col[1][1] == labels).astype(jnp.float32)),
    }


# -------------------------------------------------------------------------------------------
# 'ring_recompute' (softmax and sigmoid): custom_vjp, the ring run again in the backward pass.
# -------------------------------------------------------------------------------------------


def _varying(x: jax.Array, ctx: ShardContext) -> jax.Array:
    """Marks a replicated scalar as varying over the batch axes before a ``custom_vjp`` whose
    cotangent for it differs per shard; the transpose of the cast psums those cotangents, as
    autodiff does for the replicated scalars of the other variants."""
    return jax.lax.pcast(x, ctx.axes, to="varying") if ctx.axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_ring_nll(img: jax.Array, txt: jax.Array, scale: jax.Array, ctx: ShardContext):
    """``(i2t_nll, t2i_nll, i2t_argmax, t2i_argmax)``, each ``[b]``: the cross-entropy
    ``lse - L_rr`` over all ``B`` logits of this shard's image rows and of its text columns, and
    their int32 argmax (global index). ``img [b, D]`` float32, ``txt [b, D]`` any float dtype (it
    travels in that dtype), ``scale`` a scalar varying over the batch axes. The positive logit
    is subtracted per row before any sum, for the reason given in :func:`_blockwise_lse`, and
    inside the custom VJP so that its gradient (``-1`` on the diagonal) cancels the softmax's
    (``~1`` there when the pairs are well separated) in float32, before a bf16 ``txt``'s
    gradient is rounded."""
    out, _ = _softmax_ring_nll_fwd(img, txt, scale, ctx)
    return out


def _softmax_ring_nll_fwd(img, txt, scale, ctx):
    (row_lse, row_top), (col_lse, col_top) = _softmax_ring_pass(img, txt, scale, ctx)
    positives = scale * jnp.sum(img * _f32(txt), axis=1)
    out = (_lse_final(row_lse) - positives, _lse_final(col_lse) - positives,
           row_top[1], col_top[1])
    # Residuals beyond the (already live) inputs: (max, sum of exp) per row and column, 4 x [b].
    return out, (img, txt, scale, row_lse, col_lse)


def _softmax_ring_nll_bwd(ctx, residuals, cotangents):
    """The ring again: ``d lse / d L = softmax``, per row for the image->text terms and per
    column for the text->image ones. With row and column cotangents ``g_r``, ``h_c`` the block
    ``(i, j)`` of logits gets ``P = g_r exp(L - m_r) / s_r + h_c exp(L - m_c) / s_c``, minus
    ``g_r + h_r`` on the diagonal of the local block (the positives), whence
    ``dI_i += s P T_j``, ``dT_j += s P^T I_i``, ``dscale += <P, I_i T_j^T>``. ``T_j`` travels
    with its column statistics ``(m_c, h_c / s_c)`` and its float32 gradient accumulator
    ``dT_j``; the last hop brings ``dT_j`` home. The softmax uses the forward pass's max and
    sum rather than ``exp(L - lse)``, as :func:`_blockwise_lse_bwd` explains."""
    img, txt, scale, (row_m, row_s), (col_m, col_s) = residuals
    g, h = cotangents[0], cotangents[1]  # The argmax outputs have no cotangent (integer).
    g_row = (g / row_s)[:, None]

    def visit(row, col, t, _src, first):
        d_img, d_scale = row
        m_c, h_c, d_t = col
        t = _f32(t)
        raw = img @ t.T  # [b, b]
        logits = scale * raw
        p = (jnp.exp(logits - row_m[:, None]) * g_row
             + jnp.exp(logits - m_c[None, :]) * h_c[None, :])
        if first:  # The local block: its diagonal holds the positive pairs.
            p = p - jnp.diag(g + h)
        p_t = p @ t  # [b, D]
        # <P, I T^T> as sum(I * (P T)): the raw [b, b] block need not outlive P.
        return ((d_img + scale * p_t, d_scale + jnp.sum(img * p_t)),
                (m_c, h_c, d_t + scale * (p.T @ img)))

    zero = jnp.zeros_like(row_m[0])
    row, col = _ring(img, txt, ctx, visit, (jnp.zeros_like(img), zero),
                     (col_m, h / col_s, jnp.zeros_like(img)))
    return row[0], col[2].astype(txt.dtype), row[1].astype(jnp.result_type(scale))


_softmax_ring_nll.defvjp(_softmax_ring_nll_fwd, _softmax_ring_nll_bwd)


@_register(CONTRASTIVE_VARIANTS, "ring_recompute")
def _contrastive_ring_recompute(img: jax.Array, txt: jax.Array, scale: jax.Array,
                                ctx: ShardContext) -> dict[str, jax.Array]:
    """``'ring'`` with O(b x D) instead of O(B x D) memory: recompute, don't store.

    JAX's autodiff of ``'ring'`` saves every received text block for the backward pass, ``n - 1``
    blocks of ``[b, D]``. Here :func:`_softmax_ring_nll`, a ``jax.custom_vjp``, runs the same
    forward ring but keeps only the per-row and per-column log-sum-exp statistics (``[b]``
    each); its backward pass sends the text blocks around the ring a second time, together with
    their float32 gradient accumulators, and recomputes each ``[b, b]`` block of logits to form
    its softmax. No received block outlives its hop. The price is communication: the backward
    pass moves ``n - 1`` text blocks plus ``n`` float32 gradient blocks per shard, where
    ``'ring'``'s moves ``n - 1`` gradient blocks (the transpose of its ``ppermute``) in the
    input dtype; the forward pass is the same.
    """
    nll_i2t, nll_t2i, top_i2t, top_t2i = _softmax_ring_nll(_f32(img), txt,
                                                            _varying(scale, ctx), ctx)
    labels = ctx.row_ids()
    return {
        "i2t_nll": jnp.sum(nll_i2t),
        "t2i_nll": jnp.sum(nll_t2i),
        "i2t_correct": jnp.sum((top_i2t == labels).astype(jnp.float32)),
        "t2i_correct": jnp.sum((top_t2i == labels).astype(jnp.float32)),
    }


# -------------------------------------------------------------------------------------------
# Softmax contrastive: 'chunked' (custom_vjp, blockwise forward and backward).
# -------------------------------------------------------------------------------------------

DEFAULT_CHUNK_SIZE = 4096


def _block_starts(n_keys: int, chunk: int) -> jax.Array:
    """Nominal first column of each of the ``ceil(B / chunk)`` blocks."""
    return jnp.arange(-(-n_keys // chunk), dtype=jnp.int32) * chunk


def _block(keys: jax.Array, start: jax.Array, chunk: int):
    """The ``[chunk, D]`` block of ``keys`` at nominal column ``start``, as a slice (no copy of
    ``keys``). When ``chunk`` does not divide ``B`` the last block is shifted back to end at
    column ``B``; its columns before ``start`` belong to the previous block and are masked.
    Returns ``(block, first column, global column ids [chunk], mask of new columns [chunk])``."""
    first = jnp.minimum(start, keys.shape[0] - chunk)
    ids = first + jnp.arange(chunk, dtype=jnp.int32)
    return jax.lax.dynamic_slice_in_dim(keys, first, chunk, axis=0), first, ids, ids >= start


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_lse(query: jax.Array, keys: jax.Array, scale: jax.Array, chunk: int
                   ) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp_c(scale * query_r . keys_c), argmax_c)`` per row ``r`` over all ``B`` keys,
    computed ``chunk`` keys at a time. ``query [b, D]`` float32, ``keys [B, D]`` any float dtype
    (upcast one block at a time); both outputs are ``[b]``: the float32 lse, and the int32 argmax
    (ties to the smaller index) for the accuracy metrics. The lse is returned per row, not
    summed, so that the caller subtracts each row's positive logit before summing: both are
    ``O(s)`` (up to 100) while their difference is ``O(log B)``, and subtracting two sums of
    ``b`` such values would lose ``log2(b)`` bits of the loss."""
    out, _ = _blockwise_lse_fwd(query, keys, scale, chunk)
    return out


def _blockwise_lse_fwd(query, keys, scale, chunk):
    def body(carry, start):
        lse_state, top = carry
        k, _, ids, new = _block(keys, start, chunk)
        # Keys stay in their (e.g. bf16) dtype except one block at a time.
        block = jnp.where(new[None, :], scale * (query @ _f32(k).T), _NEG_INF)  # [b, chunk]
        return (_lse_update(lse_state, block, 1), _top1_update(top, block, ids, 1)), None

    row = query[:, 0]  # The carries are built from the query: same per-shard type as the loop's.
    neg_inf = jnp.full_like(row, _NEG_INF)
    init = ((neg_inf, jnp.zeros_like(row)),
            (neg_inf, jnp.full_like(row, keys.shape[0], dtype=jnp.int32)))
    ((m, total), top), _ = jax.lax.scan(body, init, _block_starts(keys.shape[0], chunk))
    # Residuals beyond the (already live) inputs: the row max and the sum of exp(L - max), [b].
    return (m + jnp.log(total), top[1]), (query, keys, scale, m, total)


def _blockwise_lse_bwd(chunk, residuals, cotangents):
    """``d lse_r / d logits_rc = softmax_rc = exp(logit_rc - m_r) / l_r``, one block at a time:
    with the row cotangents ``g [b]`` and ``P_c = g[:, None] * softmax`` of block ``c``,
    ``dQ = s sum_c P_c K_c``, ``dK_c = s P_c^T Q``, ``ds = sum_c <P_c, Q K_c^T>``.

    The softmax uses the forward pass's row max ``m`` and sum ``l`` rather than
    ``exp(logit - lse)``, which would add the rounding error of ``lse`` (about ``s``, up to 100:
    one ulp is 8e-6) to every exponent. ``dK`` is written block by block into one ``[B, D]``
    buffer in the keys' dtype (the cotangent of a bf16 input is bf16)."""
    query, keys, scale, m, total = residuals
    # [b, 1] row factors g_r / l_r; the argmax output has no cotangent (integer).
    g = (cotangents[0] / total)[:, None]

    def body(carry, start):
        d_query, d_keys, d_scale = carry
        k, first, _, new = _block(keys, start, chunk)
        k = _f32(k)
        raw = query @ k.T  # [b, chunk]
        p = jnp.where(new[None, :], jnp.exp(scale * raw - m[:, None]), 0.0) * g
        d_query = d_query + scale * (p @ k)
        d_scale = d_scale + jnp.sum(p * raw)
        d_k = (scale * (p.T @ query)).astype(keys.dtype)  # [chunk, D]
        # Columns already written by the previous block (shifted last block) keep their value.
        old = jax.lax.dynamic_slice_in_dim(d_keys, first, chunk, axis=0)
        d_keys = jax.lax.dynamic_update_slice_in_dim(
            d_keys, jnp.where(new[:, None], d_k, old), first, axis=0)
        return (d_query, d_keys, d_scale), None

    init = (jnp.zeros_like(query), jnp.zeros_like(keys), jnp.zeros_like(m[0]))
    (d_query, d_keys, d_scale), _ = jax.lax.scan(body, init,
                                                 _block_starts(keys.shape[0], chunk))
    return d_query, d_keys, d_scale.astype(jnp.result_type(scale))


_blockwise_lse.defvjp(_blockwise_lse_fwd, _blockwise_lse_bwd)


@_register(CONTRASTIVE_VARIANTS, "chunked")
def _contrastive_chunked(img: jax.Array, txt: jax.Array, scale: jax.Array, ctx: ShardContext,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, jax.Array]:
    """The 'gather' loss with O(b x chunk) instead of O(b x B) logit memory (Inf-CL's idea).

    Shard ``i`` all-gathers both modalities (``[B, D]`` each, as ``'gather'``) but never forms
    its ``[b, B]`` logit rows. :func:`_blockwise_lse`, a ``jax.custom_vjp``, walks the gathered
    features in blocks of ``chunk_size`` columns with the online log-sum-exp recurrence::

        m' = max(m, max_c L_c)      l' = l * exp(m - m') + sum_c exp(L_c - m')     lse = m + log l

    keeping only the per-row ``m`` and ``l`` (``[b]`` each) as residuals. The image->text rows
    use ``(Q, K) = (I[R_i], T_all)``, the text->image rows ``(T[R_i], I_all)``. With
    ``loss = (sum_r lse_i2t_r - L_rr + sum_r lse_t2i_r - L_rr) / (2B)``, the loss's derivative
    w.r.t. a row of logits is ``(softmax(row) - onehot(label)) / (2B)``: the backward pass
    recomputes each ``[b, chunk]`` block ``L = s Q K_c^T``, forms its softmax
    ``exp(L - m) / l`` and accumulates ``dQ`` (carried, ``[b, D]``), ``dK_c`` (written into a
    ``[B, D]`` buffer) and ``ds``; the ``-onehot`` part is the gradient of the positive logit
    ``s I_r . T_r``, a plain local dot product differentiated by JAX. So
    neither pass holds more than one ``[b, chunk]`` block of logits (times a small constant for
    the exp / mask temporaries), whatever the global batch; the ``[B, D]`` gathered features and
    their gradients are the only O(B) buffers, as in every all-gather loss. Gradients of the
    gathered copies return to their owners through the all-gather's transpose (reduce-scatter),
    so the result equals the dense loss exactly as ``'gather'`` does. ``chunk_size`` need not
    divide ``B``: the last block is shifted back to end at column ``B`` and its columns that the
    previous block already covered are masked out.
    """
    # The gathered features keep the input dtype (bf16 halves the O(B x D) buffers); each block
    # is upcast to float32 inside the loops.
    all_txt = ctx.all_gather(txt)
    all_img = ctx.all_gather(img)
    img, txt = _f32(img), _f32(txt)
    chunk = max(1, min(int(chunk_size), all_txt.shape[0]))
    # The custom_vjp's scale cotangent differs per shard: mark the replicated scale as varying
    # over the batch axes, whose transpose psums those cotangents, as autodiff does for 'gather'.
    scale_v = jax.lax.pcast(scale, ctx.axes, to="varying") if ctx.axes else scale
    lse_i2t, top_i2t = _blockwise_lse(img, all_txt, scale_v, chunk)
    lse_t2i, top_t2i = _blockwise_lse(txt, all_img, scale_v, chunk)
    positives = scale * jnp.sum(img * txt, axis=1)  # [b]
    labels = ctx.row_ids()
    return {
        "i2t_nll": jnp.sum(lse_i2t - positives),
        "t2i_nll": jnp.sum(lse_t2i - positives),
        "i2t_correct": jnp.sum((top_i2t == labels).astype(jnp.float32)),
        "t2i_correct": jnp.sum((top_t2i == labels).astype(jnp.float32)),
    }


# -------------------------------------------------------------------------------------------
# Public sharded losses.
# -------------------------------------------------------------------------------------------


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float,
                     *, mesh: Mesh, variant: str = "gather", chunk_size: int | None = None
                     ) -> tuple[jax.Array, Metrics]:
    """CLIP's symmetric softmax contrastive loss over a batch sharded on ``mesh``.

    Equal (to float tolerance) to :func:`dense_contrastive_loss` on the gathered batch, value and
    gradients w.r.t. all three inputs, for any mesh shape, but no device ever holds the ``[B, B]``
    logits.

    Args:
      image_emb, text_emb: global ``[B, D]`` arrays (any float dtype), leading dimension sharded
        over the batch axes ``('slice', 'data', 'fsdp')`` of ``mesh`` (other layouts are
        resharded by ``shard_map``); row ``r`` of both is a positive pair.
      logit_scale: scalar multiplicative scale ``s`` (``exp`` of the learned log-temperature,
        clamped by the caller), replicated.
      mesh: the global mesh; its ``tensor`` axis (and any non-batch axis) holds replicas.
      variant: ``'gather'`` (default; open_clip's ``local_loss=True, gather_with_grad=True``),
        ``'ring'`` (text blocks ``ppermute``-d around the batch shards, online log-sum-exp),
        ``'chunked'`` (all-gather, then a ``custom_vjp`` online log-sum-exp over blocks of
        ``chunk_size`` columns, recomputed in the backward pass: ``b x chunk`` logit memory) or
        ``'ring_recompute'`` (``'ring'`` as a ``custom_vjp`` that keeps only the per-row and
        per-column log-sum-exp and, in the backward pass, sends the text blocks and their
        gradient accumulators around the ring again, recomputing each ``b x b`` block: O(b x D)
        memory per device instead of ``'ring'``'s O(B x D) saved text blocks, for ``n - 1``
        more text-block hops).
      chunk_size: columns per block of ``'chunked'`` (default :data:`DEFAULT_CHUNK_SIZE`,
        clamped to ``B``; need not divide ``B``). Only valid with ``variant='chunked'``.

    Math of ``'gather'``: with ``n`` batch shards of ``b = B / n`` rows, shard ``i`` (rows
    ``R_i = i*b + arange(b)``) all-gathers the other modality and computes its own rows of both
    logit matrices, ``s * I[R_i] @ T.T`` and ``s * T[R_i] @ I.T`` (each ``[b, B]``), with labels
    ``axis_index(batch_axes) * b + arange(b)`` (the linearised shard index, in the same order as
    the tiled ``all_gather`` concatenation). Each shard sums its ``b`` cross-entropies per
    direction, a ``psum`` over the batch axes adds the shards, and dividing by ``B`` gives the
    global means; the loss is the mean of the two directions.

    Why the gradients are right: ``all_gather`` is linear and its transpose is a
    reduce-scatter (``psum_scatter``). Image row ``r`` of shard ``i`` is used both locally (its
    image->text rows) and, via the gathered copy, in every shard's text->image logits; the
    backward pass of the gather sums the cotangents every shard computed for the gathered copy and
    scatters back to shard ``i`` exactly its rows, so it receives the full ``dL/dI_r`` of the
    dense loss. The ``psum`` of the local sums is the transpose partner that broadcasts the output
    cotangent ``1/B`` to every shard (``shard_map`` tracks replication, so no extra factor ``n``
    appears), and the replicated ``logit_scale`` gets the psum of the per-shard contributions.
    The ``tensor`` axis is not reduced over: its replicas compute identical values.

    Returns:
      ``(loss, {'i2t_acc': ..., 't2i_acc': ...})``, float32 scalars replicated on the mesh.

    Raises:
      ValueError: image/text shapes differ or are not 2-D, ``B`` is not divisible by the number
        of batch shards of ``mesh``, ``logit_scale`` is not a scalar, or ``variant`` is unknown.
    """
    fn = "contrastive_loss"
    body = _lookup(fn, CONTRASTIVE_VARIANTS, variant,
                   " (For SigLIP's sigmoid loss use vlm_jax.losses.sigmoid_loss.)")
    shape = _check_pair(fn, image_emb, text_emb)
    _check_scalar(fn, "logit_scale", logit_scale)
    _check_mesh(fn, mesh, shape, tuple(jnp.shape(text_emb)))
    if chunk_size is not None:
        if variant != "chunked":
            raise ValueError(f"{fn}: chunk_size={chunk_size} only applies to variant='chunked', "
                             f"not {variant!r}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{fn}: chunk_size must be a positive int (columns of logits per "
                             f"block), got {chunk_size!r}.")
        body = functools.partial(body, chunk_size=chunk_size)
    combine = lambda sums, bsz: (sums["i2t_nll"] + sums["t2i_nll"]) / (2 * bsz)  # noqa: E731
    return _run_sharded(body, mesh, image_emb, text_emb, (jnp.asarray(logit_scale),), combine)


# -------------------------------------------------------------------------------------------
# Sigmoid (SigLIP).
# -------------------------------------------------------------------------------------------


def _sigmoid_block_nll(block: jax.Array, positive_diag: bool) -> jax.Array:
    """``-sum log_sigmoid(z * block)`` with ``z = -1`` everywhere except ``+1`` on the diagonal
    of a block that holds the positive pairs."""
    if positive_diag:
        z = 2 * jnp.eye(block.shape[0], dtype=block.dtype) - 1
        return -jnp.sum(jax.nn.log_sigmoid(z * block))
    return -jnp.sum(jax.nn.log_sigmoid(-block))


def _sigmoid_ring_pass(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array,
                       ctx: ShardContext):
    """The forward ring of the sigmoid loss: ``((nll, row top1), col top1)`` of this shard's
    image rows and (home again) text columns. Shared by ``'ring'`` and ``'ring_recompute'``."""
    b = ctx.b
    local = jnp.arange(b)

    def visit(row, col, t, src, first):
        block = scale * (img @ _f32(t).T) + bias
        nll, top = row
        nll = nll + _sigmoid_block_nll(block, positive_diag=first)
        row = (nll, _top1_update(top, block, src * b + local, 1))
        return row, _top1_update(col, block, ctx.index * b + local, 0)

    return _ring(img, txt, ctx, visit, (jnp.zeros((), jnp.float32), _top1_init(b)),
                 _top1_init(b))


def _sigmoid_sums(nll: jax.Array, top_i2t: jax.Array, top_t2i: jax.Array,
                  ctx: ShardContext) -> dict[str, jax.Array]:
    labels = ctx.row_ids()
    return {
        "nll": nll,
        "i2t_correct": jnp.sum((top_i2t == labels).astype(jnp.float32)),
        "t2i_correct": jnp.sum((top_t2i == labels).astype(jnp.float32)),
    }


@_register(SIGMOID_VARIANTS, "ring")
def _sigmoid_ring(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array,
                  ctx: ShardContext) -> dict[str, jax.Array]:
    """big_vision's chunked sigmoid loss: the local ``[b, b]`` block holds the positives on its
    diagonal; the text blocks of the other ``n - 1`` shards arrive by ``ppermute`` and are all
    negatives. No normaliser couples the blocks, so the local sums just add up."""
    row, col = _sigmoid_ring_pass(_f32(img), txt, scale, bias, ctx)
    return _sigmoid_sums(row[0], row[1][1], col[1], ctx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sigmoid_ring_nll(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array,
                      ctx: ShardContext):
    """``(nll, row_argmax, col_argmax)``: this shard's summed sigmoid loss over all ``B`` texts
    and the int32 top-1 indices of its image rows and text columns. Arguments as
    :func:`_softmax_ring_nll`, plus the additive ``bias`` (also varying)."""
    out, _ = _sigmoid_ring_nll_fwd(img, txt, scale, bias, ctx)
    return out


def _sigmoid_ring_nll_fwd(img, txt, scale, bias, ctx):
    (nll, row_top), col_top = _sigmoid_ring_pass(img, txt, scale, bias, ctx)
    return (nll, row_top[1], col_top[1]), (img, txt, scale, bias)


def _sigmoid_ring_nll_bwd(ctx, residuals, cotangents):
    """The ring again. ``d/dL [-log_sigmoid(z L)] = -z sigmoid(-z L)``, with ``z = +1`` on the
    diagonal of the local block (hop 0) and ``-1`` elsewhere; with the loss cotangent ``g``,
    ``P = -g z sigmoid(-z L)`` gives ``dI_i += s P T_j``, ``dT_j += s P^T I_i`` (travelling with
    ``T_j``, float32, home after the last hop), ``dscale += <P, I_i T_j^T>``, ``dbias += sum P``."""
    img, txt, scale, bias = residuals
    g = cotangents[0]

    def visit(row, col, t, _src, first):
        d_img, d_scale, d_bias = row
        t = _f32(t)
        raw = img @ t.T  # [b, b]
        logits = scale * raw + bias
        if first:
            z = 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1
            p = -g * z * jax.nn.sigmoid(-z * logits)
        else:
            p = g * jax.nn.sigmoid(logits)
        return ((d_img + scale * (p @ t), d_scale + jnp.sum(p * raw), d_bias + jnp.sum(p)),
                col + scale * (p.T @ img))

    zero = jnp.zeros_like(g)
    (d_img, d_scale, d_bias), d_txt = _ring(img, txt, ctx, visit,
                                            (jnp.zeros_like(img), zero, zero),
                                            jnp.zeros_like(img))
    return (d_img, d_txt.astype(txt.dtype), d_scale.astype(jnp.result_type(scale)),
            d_bias.astype(jnp.result_type(bias)))


_sigmoid_ring_nll.defvjp(_sigmoid_ring_nll_fwd, _sigmoid_ring_nll_bwd)


@_register(SIGMOID_VARIANTS, "ring_recompute")
def _sigmoid_ring_recompute(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array,
                            ctx: ShardContext) -> dict[str, jax.Array]:
    """``'ring'`` with O(b x D) memory: :func:`_sigmoid_ring_nll`, a ``jax.custom_vjp``, keeps
    nothing from its forward ring but the inputs, and its backward pass sends the text blocks
    (with their float32 gradient accumulators) around the ring again, recomputing each
    ``[b, b]`` block (SigLIP's chunked implementation, with the backward pass written out)."""
    nll, top_i2t, top_t2i = _sigmoid_ring_nll(_f32(img), txt, _varying(scale, ctx),
                                              _varying(bias, ctx), ctx)
    return _sigmoid_sums(nll, top_i2t, top_t2i, ctx)


@_register(SIGMOID_VARIANTS, "gather")
def _sigmoid_gather(img: jax.Array, txt: jax.Array, scale: jax.Array, bias: jax.Array,
                    ctx: ShardContext) -> dict[str, jax.Array]:
    """Sigmoid loss from all-gathered texts: local ``[b, B]`` rows, positives at column
    ``axis_index * b + r``. (Images are gathered too, only for the text->image accuracy.)"""
    all_txt = _f32(ctx.all_gather(txt))
    all_img = jax.lax.stop_gradient(_f32(ctx.all_gather(img)))
    img = _f32(img)
    labels = ctx.row_ids()
    logits = scale * (img @ all_txt.T) + bias
    z = jnp.where(jnp.arange(all_txt.shape[0])[None, :] == labels[:, None], 1.0, -1.0)
    l_t2i = scale * (jax.lax.stop_gradient(_f32(txt)) @ all_img.T)
    return {
        "nll": -jnp.sum(jax.nn.log_sigmoid(z * logits)),
        "i2t_correct": _correct_rows(logits, labels),
        "t2i_correct": _correct_rows(jax.lax.stop_gradient(l_t2i), labels),
    }


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float,
                 logit_bias: jax.Array | float, *, mesh: Mesh,
                 variant: str = "ring") -> tuple[jax.Array, Metrics]:
    """SigLIP's pairwise sigmoid loss over a batch sharded on ``mesh``.

    Equals :func:`dense_sigmoid_loss` (``-1/B * sum_{r,c} log_sigmoid(z_rc * (s I_r.T_c + b))``,
    ``z = +1`` on the diagonal, ``-1`` elsewhere) in value and gradients w.r.t. embeddings, scale
    and bias, without materialising ``[B, B]``.

    ``variant='ring'`` (default) is big_vision's form: shard ``i`` first scores its own
    ``[b, b]`` block (positives on the diagonal), then ``n - 1`` times passes its current text block
    to the next shard (``ppermute``) and scores the received block, all negatives. Because the
    sigmoid loss has no per-row normaliser the blocks' sums simply add; a final ``psum`` over the
    batch axes and division by ``B`` gives the global loss. Text gradients travel back around the
    ring through the transpose of ``ppermute``, but JAX's autodiff keeps the ``n - 1`` received
    text blocks for that (O(B x D) per device). ``variant='ring_recompute'`` is the same
    forward ring in a ``jax.custom_vjp`` that keeps nothing but its inputs: the backward pass
    sends the text blocks around the ring again, with float32 gradient accumulators travelling
    alongside, and recomputes each ``[b, b]`` block (O(b x D) memory, ``n - 1`` more text-block
    hops). ``variant='gather'`` all-gathers the texts instead (``[b, B]`` local logits;
    gradient via the gather's reduce-scatter transpose).

    Args are as :func:`contrastive_loss`, plus the scalar additive ``logit_bias``.
    Returns ``(loss, {'i2t_acc', 't2i_acc'})``; raises ValueError on bad shapes / mesh / variant.
    """
    fn = "sigmoid_loss"
    body = _lookup(fn, SIGMOID_VARIANTS, variant)
    shape = _check_pair(fn, image_emb, text_emb)
    _check_scalar(fn, "logit_scale", logit_scale)
    _check_scalar(fn, "logit_bias", logit_bias)
    _check_mesh(fn, mesh, shape, tuple(jnp.shape(text_emb)))
    combine = lambda sums, bsz: sums["nll"] / bsz  # noqa: E731
    return _run_sharded(body, mesh, image_emb, text_emb,
                        (jnp.asarray(logit_scale), jnp.asarray(logit_bias)), combine)
