"""Tests of vlm_jax.losses.

Three independent levels of reference:
1. a float64 numpy implementation of the CLIP / SigLIP pseudo-code with hand-derived gradients,
   checked against the dense JAX references;
2. the dense single-device references, against which every sharded variant on every mesh is
   checked (value, all gradients and metrics) under ``jax.jit``;
3. the compiled HLO of the sharded loss, checked for the absence of a per-device [B, B] matrix.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from vlm_jax import losses
from vlm_jax.parallel import MESH_AXES, batch_spec, create_mesh

D = 16
SCALES = (1 / 0.07, 100.0)  # CLIP init (~14.3) and open_clip's clamp.

MESHES = {
    "data8": {"data": 8},
    "data2_fsdp4": {"data": 2, "fsdp": 4},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp8": {"fsdp": 8},
    "fsdp2_tensor4": {"fsdp": 2, "tensor": 4},
    "one_device": None,
}


@functools.cache
def get_mesh(name: str):
    shape = MESHES[name]
    if shape is None:
        return create_mesh({}, devices=jax.devices()[:1])
    return create_mesh(shape)


def embeddings(batch: int, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Random unit-norm image embeddings and noisy unit-norm 'captions' of them (float32)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(batch, D))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + noise * rng.normal(size=(batch, D))
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


# ------------------------------------------------------------------------------------------
# Plain numpy (float64) references with analytic gradients.
# ------------------------------------------------------------------------------------------


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def np_clip_loss(img, txt, scale):
    """CLIP pseudo-code in float64: loss, (d_img, d_txt, d_scale), (i2t_acc, t2i_acc)."""
    img, txt = np.float64(img), np.float64(txt)
    n = img.shape[0]
    sim = img @ txt.T
    logits = scale * sim
    ls_r, ls_c = _np_log_softmax(logits), _np_log_softmax(logits.T)
    idx = np.arange(n)
    loss = (-ls_r[idx, idx].mean() - ls_c[idx, idx].mean()) / 2
    # dL/dlogits: softmax minus one-hot, for rows and (transposed) for columns, each /(2n).
    g = ((np.exp(ls_r) - np.eye(n)) + (np.exp(ls_c) - np.eye(n)).T) / (2 * n)
    grads = (scale * g @ txt, scale * g.T @ img, np.sum(g * sim))
    accs = ((logits.argmax(1) == idx).mean(), (logits.argmax(0) == idx).mean())
    return loss, grads, accs


def np_sigmoid_loss(img, txt, scale, bias):
    """SigLIP pseudo-code in float64: loss, (d_img, d_txt, d_scale, d_bias)."""
    img, txt = np.float64(img), np.float64(txt)
    n = img.shape[0]
    sim = img @ txt.T
    logits = scale * sim + bias
    z = 2 * np.eye(n) - 1
    loss = np.logaddexp(0, -z * logits).sum() / n  # -log_sigmoid(x) = log(1 + exp(-x))
    g = -z / (1 + np.exp(z * logits)) / n  # d/dl [-log_sigmoid(z l)] = -z * sigmoid(-z l)
    return loss, (scale * g @ txt, scale * g.T @ img, np.sum(g * sim), np.sum(g))


# ------------------------------------------------------------------------------------------
# Level 1: dense JAX references == numpy.
# ------------------------------------------------------------------------------------------

dense_clip_vg = jax.jit(jax.value_and_grad(losses.dense_contrastive_loss, argnums=(0, 1, 2),
                                           has_aux=True))
dense_sig_vg = jax.jit(jax.value_and_grad(losses.dense_sigmoid_loss, argnums=(0, 1, 2, 3),
                                          has_aux=True))


@pytest.mark.parametrize("batch", [32, 64])
@pytest.mark.parametrize("scale", SCALES)
def test_dense_contrastive_matches_numpy(batch, scale):
    img, txt = embeddings(batch, seed=batch)
    (loss, metrics), grads = dense_clip_vg(img, txt, jnp.float32(scale))
    ref_loss, ref_grads, ref_accs = np_clip_loss(img, txt, np.float32(scale))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([metrics["i2t_acc"], metrics["t2i_acc"]], ref_accs)
    # The data is neither trivially separable nor random: accuracies strictly inside (0, 1).
    assert 0 < ref_accs[0] < 1 and 0 < ref_accs[1] < 1


def test_dense_contrastive_is_clip_pseudocode_on_a_tiny_case():
    # Two orthogonal pairs: logits = s * I, so CE = log(1 + e^-s) in both directions.
    e = np.eye(2, dtype=np.float32)
    loss, metrics = losses.dense_contrastive_loss(e, e, 2.0)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-2.0)), rtol=1e-6)
    assert float(metrics["i2t_acc"]) == 1.0 and float(metrics["t2i_acc"]) == 1.0


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, 3.0)])
def test_dense_sigmoid_matches_numpy(scale, bias):
    img, txt = embeddings(32, seed=1)
    (loss, _), grads = dense_sig_vg(img, txt, jnp.float32(scale), jnp.float32(bias))
    ref_loss, ref_grads = np_sigmoid_loss(img, txt, np.float32(scale), np.float32(bias))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Level 2: sharded variants == dense reference on every mesh.
# ------------------------------------------------------------------------------------------


def _put(mesh, *arrays):
    sharding = NamedSharding(mesh, batch_spec(2))
    return [jax.device_put(a, sharding) for a in arrays]


def _assert_close(got, want, what):
    (g_loss, g_met), g_grads = got
    (w_loss, w_met), w_grads = want
    assert g_loss.shape == () and g_loss.dtype == jnp.float32, what
    np.testing.assert_allclose(g_loss, w_loss, rtol=1e-5, atol=1e-5, err_msg=f"{what}: loss")
    names = ["d_image", "d_text", "d_scale", "d_bias"]
    for name, g, w in zip(names, g_grads, w_grads):
        assert g.shape == w.shape, (what, name)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{what}: {name}")
    assert set(g_met) == {"i2t_acc", "t2i_acc"}
    for k in g_met:
        np.testing.assert_allclose(g_met[k], w_met[k], err_msg=f"{what}: {k}")


@pytest.mark.parametrize("variant", sorted(losses.CONTRASTIVE_VARIANTS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_contrastive_sharded_matches_dense(mesh_name, variant):
    mesh = get_mesh(mesh_name)
    fn = jax.jit(jax.value_and_grad(
        functools.partial(losses.contrastive_loss, mesh=mesh, variant=variant),
        argnums=(0, 1, 2), has_aux=True))
    for batch in (32, 64):
        img, txt = embeddings(batch, seed=batch)
        for scale in SCALES:
            s = jnp.float32(scale)
            got = fn(*_put(mesh, img, txt), s)
            want = dense_clip_vg(img, txt, s)
            _assert_close(got, want, f"{mesh_name}/{variant}/B={batch}/scale={scale}")


@pytest.mark.parametrize("variant", sorted(losses.SIGMOID_VARIANTS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sigmoid_sharded_matches_dense(mesh_name, variant):
    mesh = get_mesh(mesh_name)
    fn = jax.jit(jax.value_and_grad(
        functools.partial(losses.sigmoid_loss, mesh=mesh, variant=variant),
        argnums=(0, 1, 2, 3), has_aux=True))
    img, txt = embeddings(64, seed=3)
    for scale, bias in [(10.0, -10.0), (100.0, 2.0)]:
        args = (jnp.float32(scale), jnp.float32(bias))
        got = fn(*_put(mesh, img, txt), *args)
        want = dense_sig_vg(img, txt, *args)
        _assert_close(got, want, f"{mesh_name}/{variant}/scale={scale}")


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_chunked_matches_dense_for_any_chunk_size(mesh_name):
    """Blocks that divide the gathered batch (16), that do not (7, 48: the last block is shifted
    back over columns of the previous one, which must be masked), of one column, and larger
    than the batch (clamped): always the dense value, gradients and accuracies."""
    mesh = get_mesh(mesh_name)
    img, txt = embeddings(64, seed=21)
    for chunk in (1, 7, 16, 48, 1000):
        fn = jax.jit(jax.value_and_grad(
            functools.partial(losses.contrastive_loss, mesh=mesh, variant="chunked",
                              chunk_size=chunk), argnums=(0, 1, 2), has_aux=True))
        for scale in SCALES:
            s = jnp.float32(scale)
            _assert_close(fn(*_put(mesh, img, txt), s), dense_clip_vg(img, txt, s),
                          f"{mesh_name}/chunk={chunk}/scale={scale}")


def _assert_bf16_matches_dense(got, want, *, rtol, atol_of_max):
    """``((loss, metrics), grads)`` of a sharded loss on bf16 inputs against the dense reference's:
    a float32 loss within 1e-5, the same metrics, and bf16 gradients within ``rtol`` and
    ``atol_of_max`` times the largest reference entry."""
    (loss, metrics), grads = got
    (w_loss, w_metrics), w_grads = want
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, w_loss, rtol=1e-5)
    for k in w_metrics:
        np.testing.assert_allclose(metrics[k], w_metrics[k], err_msg=k)
    for g, w in zip(grads, w_grads):
        assert g.dtype == w.dtype
        w = np.float32(w)
        np.testing.assert_allclose(np.float32(g), w, rtol=rtol,
                                   atol=atol_of_max * np.abs(w).max())


def test_chunked_bfloat16_inputs_and_tied_scores():
    """bf16 features (upcast inside) and duplicated rows, whose equal logits must resolve the
    accuracy argmax to the smaller index as the dense argmax does."""
    mesh = get_mesh("data2_fsdp4")
    img, txt = embeddings(32, seed=23)
    img[5], txt[5] = img[4], txt[4]  # Two identical pairs: ties across a block boundary.
    img, txt = (jnp.asarray(a, jnp.bfloat16) for a in (img, txt))
    fn = jax.jit(jax.value_and_grad(
        functools.partial(losses.contrastive_loss, mesh=mesh, variant="chunked", chunk_size=5),
        argnums=(0, 1, 2), has_aux=True))
    # Gradients come back in the inputs' bf16, and the gathered copies' cotangents are summed
    # over the 8 shards in bf16 by the reduce-scatter: a few bf16 ulps of the largest entry.
    _assert_bf16_matches_dense(fn(*_put(mesh, img, txt), jnp.float32(100.0)),
                               dense_clip_vg(img, txt, jnp.float32(100.0)),
                               rtol=0, atol_of_max=2 ** -6)


def test_chunked_loss_memory_grows_with_chunk_not_global_batch():
    """Compiled per-device temporaries of loss + gradients at B=8192 on 8 devices (b=1024).

    'gather' holds several [b, B] f32 buffers (logits, softmax, their cotangent: 32 MiB each).
    'chunked' may hold, whatever B:
      * the O(B x D) buffers every all-gather loss has: the gathered images and texts and their
        gradients before the reduce-scatter, 4 x [B, D];
      * a few [b, chunk] f32 blocks of one loop iteration (logits, exp, softmax x cotangent);
      * O(b x D) per-shard terms (f32 copies of the local rows, dQ carries, outputs).
    The bound below allows 4 blocks and 8 local [b, D] buffers; a single [b, B] buffer would
    exceed it. A chunk that does not divide B must not copy the features either."""
    mesh = get_mesh("data8")
    batch, dim, b = 8192, 64, 1024
    x = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                             sharding=NamedSharding(mesh, batch_spec(2)))
    scale = jax.ShapeDtypeStruct((), jnp.float32)

    def temp_bytes(variant, **kw):
        fn = jax.value_and_grad(
            lambda a, t, s: losses.contrastive_loss(a, t, s, mesh=mesh, variant=variant,
                                                    **kw)[0], argnums=(0, 1, 2))
        return jax.jit(fn).lower(x, x, scale).compile().memory_analysis().temp_size_in_bytes

    gather = temp_bytes("gather")
    logits_row_block = b * batch * 4  # One [b, B] f32 buffer: 32 MiB.
    assert gather >= 3 * logits_row_block  # Calibration: gather really holds [b, B] buffers.
    features = batch * dim * 4  # One gathered [B, D] f32 buffer: 2 MiB.
    local = b * dim * 4  # One local [b, D] f32 buffer: 256 KiB.
    got = {chunk: temp_bytes("chunked", chunk_size=chunk) for chunk in (256, 1000, 1024)}
    for chunk, temp in got.items():
        bound = 4 * features + 4 * b * chunk * 4 + 8 * local
        assert temp <= bound, (chunk, temp, bound)
        assert temp < logits_row_block, (chunk, temp)
    assert got[256] * 8 < gather, (got, gather)
    assert got[256] < got[1024]  # The block size, not the batch, sets the logit memory.


def test_ring_recompute_bfloat16_inputs_and_tied_scores():
    """bf16 features travel around the ring in bf16 (upcast per block) and their gradients are
    accumulated in float32 while travelling, then returned in bf16; duplicated pairs make equal
    logits in different blocks, whose accuracy argmax must go to the smaller index."""
    mesh = get_mesh("data2_fsdp4")
    img, txt = embeddings(32, seed=29)
    img[9], txt[9] = img[3], txt[3]  # Rows 3 and 9 live on different shards (b = 4).
    img, txt = (jnp.asarray(a, jnp.bfloat16) for a in (img, txt))
    cases = [
        (losses.contrastive_loss, dense_clip_vg, (jnp.float32(100.0),)),
        (losses.sigmoid_loss, dense_sig_vg, (jnp.float32(10.0), jnp.float32(-10.0))),
    ]
    for loss_fn, dense_vg, scalars in cases:
        fn = jax.jit(jax.value_and_grad(
            functools.partial(loss_fn, mesh=mesh, variant="ring_recompute"),
            argnums=tuple(range(2 + len(scalars))), has_aux=True))
        # Both sides round float32 gradients to bf16 once: at most an ulp apart.
        _assert_bf16_matches_dense(fn(*_put(mesh, img, txt), *scalars),
                                   dense_vg(img, txt, *scalars),
                                   rtol=2 ** -7, atol_of_max=2 ** -9)


def test_ring_recompute_memory_does_not_grow_with_shard_count():
    """Compiled per-device temporaries of loss + gradients at a fixed local batch b = 128
    (D = 1024, float32) on 4 and on 8 devices.

    'ring' saves the n - 1 received [b, D] text blocks for the backward pass (7 x 512 KiB on
    8 devices). 'ring_recompute' keeps O(b x D): its temporaries must not grow with the number
    of shards, and must stay within a few [b, b] logit blocks and [b, D] feature buffers (f32
    copies, gradient accumulators, the block in flight)."""
    b, dim = 128, 1024
    block, local = b * b * 4, b * dim * 4

    def temp_bytes(name, variant, n):
        mesh = create_mesh({"data": n}, devices=jax.devices()[:n])
        x = jax.ShapeDtypeStruct((n * b, dim), jnp.float32,
                                 sharding=NamedSharding(mesh, batch_spec(2)))
        s = jax.ShapeDtypeStruct((), jnp.float32)
        if name == "softmax":
            fn = lambda a, t, sc: losses.contrastive_loss(  # noqa: E731
                a, t, sc, mesh=mesh, variant=variant)[0]
            args = (x, x, s)
        else:
            fn = lambda a, t, sc, bi: losses.sigmoid_loss(  # noqa: E731
                a, t, sc, bi, mesh=mesh, variant=variant)[0]
            args = (x, x, s, s)
        vg = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))
        return vg.lower(*args).compile().memory_analysis().temp_size_in_bytes

    for name in ("softmax", "sigmoid"):
        ring8 = temp_bytes(name, "ring", 8)
        assert ring8 >= 7 * local, (name, ring8)  # Calibration: 'ring' keeps the 7 blocks.
        got = {n: temp_bytes(name, "ring_recompute", n) for n in (4, 8)}
        assert got[8] <= got[4] + block, (name, got)
        assert got[8] <= 4 * block + 6 * local, (name, got)
        assert got[8] + 3 * local < ring8, (name, got, ring8)


@pytest.mark.parametrize("chunk_size,match", [(0, "positive int"), (-3, "positive int"),
                                              (2.5, "positive int"), (True, "positive int")])
def test_bad_chunk_size_raises(chunk_size, match):
    mesh = get_mesh("data8")
    img, txt = embeddings(32)
    with pytest.raises(ValueError, match=match):
        losses.contrastive_loss(img, txt, 14.3, mesh=mesh, variant="chunked",
                                chunk_size=chunk_size)
    with pytest.raises(ValueError, match="only applies to variant='chunked'"):
        losses.contrastive_loss(img, txt, 14.3, mesh=mesh, variant="gather", chunk_size=64)


def test_tensor_axis_replicas_do_not_change_result():
    """Only tensor replicas (one batch shard) and mixed meshes agree exactly with each other."""
    img, txt = embeddings(32, seed=7)
    ref = None
    for shape in ({"tensor": 8}, {"data": 4, "tensor": 2}, {"fsdp": 2, "tensor": 4}):
        mesh = create_mesh(shape)
        loss, _ = jax.jit(functools.partial(losses.contrastive_loss, mesh=mesh))(
            *_put(mesh, img, txt), jnp.float32(14.3))
        ref = loss if ref is None else ref
        np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(ref, losses.dense_contrastive_loss(img, txt, 14.3)[0], rtol=1e-6)


@pytest.mark.parametrize("variant", ["gather", "ring", "chunked", "ring_recompute"])
def test_slice_axis_is_a_batch_axis(variant):
    """slice x data x fsdp = 2 x 2 x 2 (built directly: CPU devices have no slice_index)."""
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2, 1), MESH_AXES)
    fn = jax.jit(jax.value_and_grad(
        functools.partial(losses.contrastive_loss, mesh=mesh, variant=variant),
        argnums=(0, 1, 2), has_aux=True))
    img, txt = embeddings(32, seed=11)
    s = jnp.float32(14.3)
    _assert_close(fn(*_put(mesh, img, txt), s), dense_clip_vg(img, txt, s), f"slice/{variant}")


def test_bfloat16_inputs_computed_in_float32():
    mesh = get_mesh("data2_fsdp4")
    img, txt = (jnp.asarray(a, jnp.bfloat16) for a in embeddings(32, seed=5))
    loss, _ = jax.jit(functools.partial(losses.contrastive_loss, mesh=mesh))(
        *_put(mesh, img, txt), jnp.float32(100.0))
    want, _ = losses.dense_contrastive_loss(img, txt, 100.0)  # same bf16 values, upcast
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)


def test_python_float_scale_and_grad_only_wrt_embeddings():
    mesh = get_mesh("data8")
    img, txt = embeddings(32, seed=9)
    g = jax.jit(jax.grad(lambda a, b: losses.contrastive_loss(a, b, 14.3, mesh=mesh)[0],
                         (0, 1)))(img, txt)
    w = jax.grad(lambda a, b: losses.dense_contrastive_loss(a, b, 14.3)[0], (0, 1))(img, txt)
    for x, y in zip(g, w):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Level 3: the global [B, B] logits are never materialised per device.
# ------------------------------------------------------------------------------------------


def _compiled_f32_matrices(fn, *args) -> set[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return set(re.findall(r"f32\[\d+,\d+\]", text))


def _vg(loss_fn, nargs):
    return jax.value_and_grad(loss_fn, argnums=tuple(range(nargs)), has_aux=True)


def test_dense_hlo_does_materialise_bxb():
    """Calibrates the HLO check below: the dense loss does show f32[64,64]."""
    img, txt = embeddings(64)
    assert "f32[64,64]" in _compiled_f32_matrices(_vg(losses.dense_contrastive_loss, 3),
                                                  img, txt, jnp.float32(14.3))


@pytest.mark.parametrize("variant,local_block", [("gather", "f32[8,64]"), ("ring", "f32[8,8]"),
                                                 ("chunked", "f32[8,4]"),
                                                 ("ring_recompute", "f32[8,8]")])
def test_sharded_contrastive_hlo_has_no_global_matrix(variant, local_block):
    mesh = get_mesh("data8")
    img, txt = _put(mesh, *embeddings(64))
    kw = {"chunk_size": 4} if variant == "chunked" else {}
    fn = _vg(functools.partial(losses.contrastive_loss, mesh=mesh, variant=variant, **kw), 3)
    shapes = _compiled_f32_matrices(fn, img, txt, jnp.float32(14.3))
    assert local_block in shapes, shapes
    assert "f32[64,64]" not in shapes, shapes
    if variant in ("ring", "chunked", "ring_recompute"):
        assert "f32[8,64]" not in shapes, shapes


@pytest.mark.parametrize("variant,local_block", [("gather", "f32[8,64]"), ("ring", "f32[8,8]"),
                                                 ("ring_recompute", "f32[8,8]")])
def test_sharded_sigmoid_hlo_has_no_global_matrix(variant, local_block):
    mesh = get_mesh("data8")
    img, txt = _put(mesh, *embeddings(64))
    fn = _vg(functools.partial(losses.sigmoid_loss, mesh=mesh, variant=variant), 4)
    shapes = _compiled_f32_matrices(fn, img, txt, jnp.float32(10.0), jnp.float32(-10.0))
    assert local_block in shapes, shapes
    assert "f32[64,64]" not in shapes, shapes
    if variant == "ring_recompute":
        assert "f32[8,64]" not in shapes, shapes


# ------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------


def _sharded_fns():
    mesh = get_mesh("data8")
    return [
        ("contrastive_loss", lambda a, b, s=14.3: losses.contrastive_loss(a, b, s, mesh=mesh)),
        ("sigmoid_loss", lambda a, b, s=10.0: losses.sigmoid_loss(a, b, s, -10.0, mesh=mesh)),
        ("dense_contrastive_loss", lambda a, b, s=14.3: losses.dense_contrastive_loss(a, b, s)),
        ("dense_sigmoid_loss", lambda a, b, s=10.0: losses.dense_sigmoid_loss(a, b, s, -10.0)),
    ]


@pytest.mark.parametrize("idx", range(4))
def test_mismatched_shapes_raise(idx):
    name, fn = _sharded_fns()[idx]
    img, txt = np.zeros((32, 16), np.float32), np.zeros((32, 8), np.float32)
    with pytest.raises(ValueError, match=re.escape(name)) as err:
        fn(img, txt)
    assert "(32, 16)" in str(err.value) and "(32, 8)" in str(err.value)
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(32, 16\)"):
        fn(np.zeros((16, 16), np.float32), np.zeros((32, 16), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros((32,), np.float32), np.zeros((32,), np.float32))
    with pytest.raises(ValueError, match="scalar"):
        fn(np.zeros((32, 16), np.float32), np.zeros((32, 16), np.float32), np.ones(3))


@pytest.mark.parametrize("fn_name", ["contrastive_loss", "sigmoid_loss"])
def test_batch_not_divisible_by_shards_raises(fn_name):
    fn = dict(_sharded_fns()[:2])[fn_name]
    x = np.zeros((30, 16), np.float32)
    with pytest.raises(ValueError) as err:
        fn(x, x)
    msg = str(err.value)
    assert "30" in msg and "8 batch shards" in msg and "(30, 16)" in msg
    assert "'data': 8" in msg  # names the mesh (the fns above are bound to the data8 mesh)


def test_batch_not_divisible_names_the_mesh_shape():
    mesh = get_mesh("data2_fsdp2_tensor2")
    x = np.zeros((6, 16), np.float32)
    with pytest.raises(ValueError, match=r"4 batch shards.*'data': 2, 'fsdp': 2, 'tensor': 2"):
        losses.contrastive_loss(x, x, 14.3, mesh=mesh)


def test_unknown_variant_lists_valid_ones():
    mesh = get_mesh("data8")
    x = np.zeros((32, 16), np.float32)
    with pytest.raises(ValueError,
                       match=r"'chunky'.*\['chunked', 'gather', 'ring', 'ring_recompute'\]"):
        losses.contrastive_loss(x, x, 14.3, mesh=mesh, variant="chunky")
    with pytest.raises(ValueError, match="sigmoid_loss"):
        losses.contrastive_loss(x, x, 14.3, mesh=mesh, variant="sigmoid")
    with pytest.raises(ValueError, match=r"\['gather', 'ring', 'ring_recompute'\]"):
        losses.sigmoid_loss(x, x, 10.0, -10.0, mesh=mesh, variant="dense")


def test_non_mesh_argument_raises():
    x = np.zeros((32, 16), np.float32)
    with pytest.raises(ValueError, match="Mesh"):
        losses.contrastive_loss(x, x, 14.3, mesh={"data": 8})
