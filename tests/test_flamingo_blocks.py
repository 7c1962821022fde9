"""Flamingo's resampler, gated cross-attention and media masking against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlm_jax  # noqa: F401  (disables eager sharding)
from vlm_jax.models import count_params
from vlm_jax.models.flamingo import (GatedCrossAttentionBlock, PerceiverResampler,
                                     media_attention_mask)

D, HEADS = 16, 2


def test_media_mask_by_hand():
    # Positions:       0      1     2      3     4      5     6
    loc = np.array([[False, True, False, False, True, False, False],
                    [False, False, False, False, False, False, True]])
    m = np.asarray(media_attention_mask(jnp.asarray(loc), num_media=2, tokens_per_medium=3))
    assert m.shape == (2, 1, 7, 6)
    # Row 0: position 0 sees nothing; 1-3 see medium 1 (tokens 0-2); 4-6 medium 2 (tokens 3-5).
    want0 = np.zeros((7, 6), bool)
    want0[1:4, 0:3] = True
    want0[4:7, 3:6] = True
    np.testing.assert_array_equal(m[0, 0], want0)
    want1 = np.zeros((7, 6), bool)
    want1[6, 0:3] = True  # its only image is at position 6
    np.testing.assert_array_equal(m[1, 0], want1)


def _inputs(seed=0, b=2, length=7, t=2, m=3):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(b, length, D), jnp.float32)
    media = jnp.asarray(rs.randn(b, t, m, D), jnp.float32)
    loc = np.zeros((b, length), bool)
    loc[:, 1] = loc[:, 4] = True
    return x, media, jnp.asarray(loc)


def test_gates_at_zero_are_the_identity():
    block = GatedCrossAttentionBlock(D, num_heads=HEADS, rngs=nnx.Rngs(0))
    x, media, loc = _inputs()
    np.testing.assert_array_equal(np.asarray(block(x, media, loc)), np.asarray(x))


def test_changing_an_image_changes_only_the_tokens_that_see_it():
    block = GatedCrossAttentionBlock(D, num_heads=HEADS, rngs=nnx.Rngs(0))
    block.attn_gate.set_value(jnp.asarray(0.7))
    block.ff_gate.set_value(jnp.asarray(0.0))  # the dense part is per-token anyway
    x, media, loc = _inputs()
    base = np.asarray(block(x, media, loc))
    changed = np.asarray(block(x, media.at[:, 0].add(1.0), loc))  # image 1 (positions 1-3)
    diff = np.abs(changed - base).max(axis=-1)  # [B, L]
    assert np.all(diff[:, 1:4] > 1e-4)
    assert np.all(diff[:, [0, 4, 5, 6]] == 0)
    # Before the first image: no cross-attention update at all.
    np.testing.assert_array_equal(base[:, 0], np.asarray(x)[:, 0])


def _np_layernorm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_attention(q_in, kv_in, attn, heads):
    p = {k: np.asarray(getattr(attn, k).kernel[...]) for k in ("query", "key", "value", "out")}
    q = np.einsum("bld,dhk->blhk", q_in, p["query"])
    k = np.einsum("bld,dhk->blhk", kv_in, p["key"])
    v = np.einsum("bld,dhk->blhk", kv_in, p["value"])
    s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", o, p["out"])


def test_resampler_matches_numpy_reference():
    r = PerceiverResampler(D, depth=2, num_latents=4, num_heads=HEADS, max_frames=3,
                           rngs=nnx.Rngs(0))
    rs = np.random.RandomState(3)
    for _, var in nnx.to_flat_state(nnx.state(r, nnx.Param)):  # every parameter random
        v = var.get_value()
        var.set_value(jnp.asarray(rs.randn(*v.shape) * 0.3 + (1.0 if v.ndim == 1 else 0.0),
                                  jnp.float32))
    feats = rs.randn(2, 3, 2, 5, D).astype(np.float32)  # 2 media of 2 frames x 5 tokens
    got = np.asarray(r(jnp.asarray(feats)))
    assert got.shape == (2, 3, 4, D)

    def ln(mod, x):
        return _np_layernorm(x, np.asarray(mod.scale[...]), np.asarray(mod.bias[...]))

    x = feats + np.asarray(r.time[...])[:2][None, None, :, None]
    x = x.reshape(6, 10, D)
    lat = np.broadcast_to(np.asarray(r.latents[...]), (6, 4, D))
    for i in range(2):
        q = ln(r.norm_latents[i], lat)
        kv = np.concatenate([ln(r.norm_media[i], x), q], axis=1)
        lat = lat + _np_attention(q, kv, r.attn[i], HEADS)
        ff = r.ffw[i]
        h = ln(ff.norm, lat) @ np.asarray(ff.fc1.kernel[...])
        h = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
        lat = lat + h @ np.asarray(ff.fc2.kernel[...])
    want = ln(r.final_norm, lat).reshape(2, 3, 4, D)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_resampler_parameter_count_and_errors():
    r = nnx.eval_shape(lambda: PerceiverResampler(64, depth=6, num_latents=64, num_heads=8,
                                                  max_frames=8, rngs=nnx.Rngs(0)))
    d, mlp = 64, 256
    per_layer = 2 * 2 * d + 4 * d * d + (2 * d + 2 * d * mlp)  # 2 norms, q/k/v/out, ffw
    assert count_params(r) == 64 * d + 8 * d + 6 * per_layer + 2 * d
    with pytest.raises(ValueError, match="frames"):
        PerceiverResampler(D, depth=1, num_latents=2, num_heads=HEADS, max_frames=1,
                           rngs=nnx.Rngs(0))(jnp.zeros((1, 1, 2, 3, D)))


def test_media_of_another_width():
    block = GatedCrossAttentionBlock(D, 24, num_heads=HEADS, rngs=nnx.Rngs(0))
    block.attn_gate.set_value(jnp.asarray(1.0))
    x, _, loc = _inputs()
    media = jnp.ones((2, 2, 3, 24))
    out = jax.jit(lambda x, mdia, loc: block(x, mdia, loc))(x, media, loc)
    assert out.shape == x.shape
