"""Tests of vlm_jax.models against published numbers and independent numpy references."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import vlm_jax  # noqa: F401  (disables eager sharding)
from tests.model_fixtures import randomize
from vlm_jax import parallel
from vlm_jax.families import get_family
from vlm_jax.models import (CLIP, CLIP_PRESETS, TextTransformer, ViT, clip_config, count_params,
                            decode_variant, layers, vit_flops)

# ------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------


def tiny_clip_cfg(**top):
    cfg = dict(
        name="clip", embed_dim=16,
        image=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=16,
                   pool_type="tok", pre_norm=True, patch_bias=False, act="quick_gelu"),
        text=dict(width=24, depth=2, num_heads=3, mlp_dim=48, vocab_size=50, context_length=8,
                  eos_id=49, act="quick_gelu"),
        logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0),
        dtype="float32", remat="none", scan_layers=False)
    cfg.update(top)
    return cfg


def build_model(cfg, rngs):
    """The model of a model config, built by its family as a run builds it."""
    return get_family(cfg).build_model(cfg, rngs)


def flops_per_example(cfg, batch_size=None):
    return get_family(cfg).flops_per_example(cfg, batch_size)


def tiny_vit(**kw):
    args = dict(width=32, depth=2, num_heads=4, mlp_dim=48, patch_size=4, image_size=8)
    args.update(kw)
    return ViT(**args, rngs=nnx.Rngs(0))


# XLA:CPU compiles cost ~0.2 s each here, so tests avoid eager op-by-op execution: models are
# built abstractly and filled with numpy noise (no compile), and forwards run under nnx.jit.


@nnx.jit
def run(module, *args):
    """Jitted ``module(*args)``."""
    return module(*args)


def filled(make, seed=0, scale=0.1):
    """Abstract model from ``make`` (nnx.eval_shape) with every parameter set to N(0, scale)
    numpy noise (LayerNorm scales: 1 + noise)."""
    return randomize(nnx.eval_shape(make), seed, scale)


def shape_of(fn, *args):
    """Output shape(s) of ``fn(*args)`` without compiling (raises the same errors)."""
    return jax.tree.map(lambda x: x.shape, nnx.eval_shape(fn, *args))


def flat_params(model):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def np_params(module):
    return {k: np.asarray(v.get_value(), np.float64) for k, v in flat_params(module).items()}



# Numpy references (float64), written from the PyTorch / open_clip definitions.

def np_ln(x, p, prefix, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p[prefix + ".scale"] + p[prefix + ".bias"]


def np_mha(xq, xkv, p, prefix, num_heads, causal):
    """torch.nn.MultiheadAttention with the in_proj split into three [D, D] matrices."""
    d = xq.shape[-1]
    hd = d // num_heads

    def proj(name, x):
        w = p[f"{prefix}.{name}.kernel"].reshape(d, d)
        return x @ w + p[f"{prefix}.{name}.bias"].reshape(d)

    q, k, v = proj("query", xq), proj("key", xkv), proj("value", xkv)
    b, lq, lk = xq.shape[0], xq.shape[1], xkv.shape[1]
    q = q.reshape(b, lq, num_heads, hd).transpose(0, 2, 1, 3)
    k = k.reshape(b, lk, num_heads, hd).transpose(0, 2, 1, 3)
    v = v.reshape(b, lk, num_heads, hd).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if causal:
        s = np.where(np.tril(np.ones((lq, lk), bool)), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = s / s.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, lq, d)
    return o @ p[f"{prefix}.out.kernel"].reshape(d, d) + p[f"{prefix}.out.bias"]


def np_act(x, act):
    if act == "quick_gelu":
        return x / (1 + np.exp(-1.702 * x))
    from math import erf  # pylint: disable=import-outside-toplevel
    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def np_block(x, p, prefix, num_heads, causal, act, eps):
    h = np_ln(x, p, prefix + ".norm1", eps)
    x = x + np_mha(h, h, p, prefix + ".attn", num_heads, causal)
    h = np_ln(x, p, prefix + ".norm2", eps)
    h = np_act(h @ p[prefix + ".mlp.fc1.kernel"] + p[prefix + ".mlp.fc1.bias"], act)
    return x + h @ p[prefix + ".mlp.fc2.kernel"] + p[prefix + ".mlp.fc2.bias"]


def np_vit_clip(images, p, *, patch, depth, heads, act, eps):
    """OpenAI CLIP VisionTransformer forward (conv1 no bias, cls, pos, ln_pre, ln_post)."""
    b, h, w, _ = images.shape
    kernel = p["patch_embed.kernel"]
    tokens = []
    for i in range(h // patch):
        for j in range(w // patch):
            crop = images[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch, :]
            tokens.append(np.einsum("bpqc,pqcd->bd", crop, kernel))
    x = np.stack(tokens, 1)
    cls = np.broadcast_to(p["cls_token"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], 1) + p["pos_embed"]
    x = np_ln(x, p, "pre_norm", eps)
    for i in range(depth):
        x = np_block(x, p, f"encoder.blocks.{i}", heads, False, act, eps)
    return np_ln(x[:, 0], p, "final_norm", eps)


def np_text_clip(tokens, p, *, depth, heads, act, eps):
    """OpenAI CLIP encode_text (without projection), pooled at tokens.argmax(-1)."""
    x = p["token_embed.embedding"][tokens] + p["pos_embed"][: tokens.shape[1]]
    for i in range(depth):
        x = np_block(x, p, f"encoder.blocks.{i}", heads, True, act, eps)
    x = np_ln(x, p, "final_norm", eps)
    return x[np.arange(x.shape[0]), tokens.argmax(-1)]


# ------------------------------------------------------------------------------------------
# Sizes, parameter counts and FLOPs against published numbers.
# ------------------------------------------------------------------------------------------


def test_decode_variant_big_vision_table():
    expected = {"Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
                "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16),
                "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16),
                "e": (1792, 56, 15360, 16)}
    for name, (w, d, m, h) in expected.items():
        assert decode_variant(f"{name}/14") == dict(width=w, depth=d, mlp_dim=m, num_heads=h,
                                                    patch_size=14)
    assert "patch_size" not in decode_variant("B")
    with pytest.raises(ValueError, match="Q/16"):
        decode_variant("Q/16")


@pytest.mark.parametrize("variant,image_size,expected", [
    ("B/16", 224, 86_567_656),  # timm vit_base_patch16_224
    ("L/16", 224, 304_326_632),  # timm vit_large_patch16_224
    ("H/14", 224, 632_045_800),  # timm vit_huge_patch14_224
])
def test_vit_param_counts_match_timm(variant, image_size, expected):
    cfg = dict(variant=variant, image_size=image_size, num_classes=1000, pool_type="tok",
               patch_bias=True, pre_norm=False)
    abstract = nnx.eval_shape(lambda: ViT(**cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == expected


# open_clip docs/model_profile.csv: mparams and gflops (2 x MACs) per image-text pair.
OPEN_CLIP_PROFILE = {
    "ViT-B/32": (151.28, 14.78), "ViT-B/16": (149.62, 41.09), "ViT-L/14": (427.62, 175.33),
    "ViT-H/14": (986.11, 381.68), "ViT-g/14": (1366.68, 581.15),
}


def test_clip_b32_param_count_exact():
    # OpenAI CLIP ViT-B/32 (clip.load: "Model parameters: 151,277,313").
    abstract = nnx.eval_shape(lambda: build_model(clip_config("ViT-B/32"), rngs=nnx.Rngs(0)))
    assert count_params(abstract) == 151_277_313


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_PROFILE))
def test_clip_presets_match_open_clip_profile(name):
    mparams, gflops = OPEN_CLIP_PROFILE[name]
    cfg = clip_config(name)
    cfg["scan_layers"] = True  # same count, faster abstract init
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    assert abs(count_params(abstract) / 1e6 - mparams) <= 0.005 + 1e-9
    # The profile rounds to 0.01 GFLOP and ignores the tiny projections.
    assert abs(flops_per_example(cfg) / 1e9 - gflops) <= 0.006


def test_flops_image_tower_and_similarity_matrix():
    # open_clip image_gflops (encode_image, so including the projection to embed_dim):
    # ViT-B-16 35.13, ViT-L-14 162.03, ViT-H-14 334.59.
    for variant, embed_dim, gf in [("B/16", 512, 35.13), ("L/14", 768, 162.03),
                                   ("H/14", 1024, 334.59)]:
        proj = 2 * decode_variant(variant)["width"] * embed_dim
        assert abs((vit_flops(variant, image_size=224) + proj) / 1e9 - gf) <= 0.005 + 1e-9
    cfg = clip_config("ViT-B/32")
    extra = flops_per_example(cfg, batch_size=1024) - flops_per_example(cfg)
    assert extra == pytest.approx(2 * 1024 * 512)


def test_clip_config_names():
    assert clip_config("ViT-B-32") == CLIP_PRESETS["ViT-B/32"]
    assert clip_config("ViT-H/14")["image"]["act"] == "gelu"
    assert clip_config("ViT-L/14")["text"]["act"] == "quick_gelu"
    with pytest.raises(ValueError, match="ViT-X/1"):
        clip_config("ViT-X/1")


# ------------------------------------------------------------------------------------------
# Logical axis names.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(scan):
    rule_keys = {k for k, _ in parallel.DEFAULT_RULES}
    models = [
        lambda: build_model(tiny_clip_cfg(scan_layers=scan), rngs=nnx.Rngs(0)),
        lambda: tiny_vit(pool_type="map", num_classes=5, pre_norm=True, scan_layers=scan),
        lambda: tiny_vit(pool_type="gap", scan_layers=scan),
    ]
    for make in models:
        _, state = nnx.split(nnx.eval_shape(make))
        flat = nnx.to_flat_state(state)
        assert flat
        for path, var in flat:
            assert isinstance(var, nnx.Param), path
            names = var.get_metadata()["out_sharding"]
            shape = var.get_value().shape
            assert len(names) == len(shape), (path, names, shape)
            for i, n in enumerate(names):
                if n is None:  # only allowed on size-1 dims (MAP probe [1, 1, embed])
                    assert shape[i] == 1, (path, names)
                elif n == "layers":
                    assert scan and i == 0, (path, names)
                else:
                    assert n in rule_keys, (path, names)
        paths = {".".join(map(str, p)) for p, _ in flat}
        if scan:
            assert any(".blocks.attn.query.kernel" in p for p in paths)


def test_clip_param_paths_are_stable():
    paths = set(flat_params(nnx.eval_shape(lambda: build_model(tiny_clip_cfg(),
                                                               rngs=nnx.Rngs(0)))))
    for p in ["image.patch_embed.kernel", "image.cls_token", "image.pos_embed",
              "image.pre_norm.scale", "image.encoder.blocks.0.attn.query.kernel",
              "image.encoder.blocks.1.mlp.fc2.bias", "image.final_norm.bias",
              "text.token_embed.embedding", "text.pos_embed",
              "text.encoder.blocks.0.attn.out.kernel", "text.final_norm.scale",
              "image_projection.kernel", "text_projection.kernel", "logit_scale"]:
        assert p in paths, p
    assert "image.patch_embed.bias" not in paths
    assert not any("projection.bias" in p for p in paths)


# ------------------------------------------------------------------------------------------
# Layers against numpy references.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_numpy(causal):
    d, heads = 24, 3
    mha = filled(lambda: layers.MultiHeadAttention(d, heads, causal=causal, rngs=nnx.Rngs(1)),
                 seed=2, scale=0.3)
    x = np.random.RandomState(0).randn(2, 7, d)
    got = run(mha, jnp.asarray(x, jnp.float32))
    p = {"a." + k: v for k, v in np_params(mha).items()}
    want = np_mha(x, x, p, "a", heads, causal)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_cross_attention_matches_numpy():
    d, heads = 16, 2
    mha = filled(lambda: layers.MultiHeadAttention(d, heads, rngs=nnx.Rngs(1)), seed=3, scale=0.3)
    rs = np.random.RandomState(1)
    xq, xkv = rs.randn(2, 1, d), rs.randn(2, 5, d)
    p = {"a." + k: v for k, v in np_params(mha).items()}
    got = run(mha, jnp.asarray(xq, jnp.float32), jnp.asarray(xkv, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np_mha(xq, xkv, p, "a", heads, False),
                               atol=2e-5, rtol=1e-4)


def test_grouped_query_cross_attention_with_mask_and_cache_matches_numpy():
    """GQA (6 query heads on 2 key/value heads, HF ``repeat_kv``), keys of another width, an
    arbitrary boolean mask, and the KV cache: one call on the whole sequence equals numpy, and
    so does writing the keys/values into a cache chunk by chunk."""
    d, dkv, heads, kv_heads, hd = 12, 10, 6, 2, 4
    mha = filled(lambda: layers.MultiHeadAttention(d, heads, num_kv_heads=kv_heads, head_dim=hd,
                                                   kv_width=dkv, rngs=nnx.Rngs(1)),
                 seed=4, scale=0.3)
    p = np_params(mha)
    rs = np.random.RandomState(2)
    xq, xkv = rs.randn(2, 5, d), rs.randn(2, 7, dkv)
    mask = rs.rand(2, 1, 5, 7) < 0.7
    mask[..., 0] = True  # every query sees at least one key
    q = np.einsum("bld,dhk->blhk", xq, p["query.kernel"]) + p["query.bias"]
    k = np.einsum("bld,dhk->blhk", xkv, p["key.kernel"]) + p["key.bias"]
    v = np.einsum("bld,dhk->blhk", xkv, p["value.kernel"]) + p["value.bias"]
    k, v = np.repeat(k, heads // kv_heads, axis=2), np.repeat(v, heads // kv_heads, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    s = np.where(mask, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", a, v)
    want = np.einsum("bqhd,hde->bqe", want, p["out.kernel"]) + p["out.bias"]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = mha(f32(xq), f32(xkv), mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)

    # The cache: keys/values of xkv written in chunks of 3 and 4 at slots 0 and 3 of 9.
    cache = mha.init_cache(2, 9)
    assert cache["k"].shape == (2, 9, kv_heads, hd)
    _, cache = mha(f32(xq[:, :2]), f32(xkv[:, :3]), cache=cache, cache_index=0)
    pad = np.zeros((2, 1, 5, 2), bool)  # the two unused slots are masked
    got, cache = mha(f32(xq), f32(xkv[:, 3:]), mask=jnp.asarray(np.concatenate([mask, pad], -1)),
                     cache=cache, cache_index=3)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_map_head_matches_numpy():
    # big_vision MAPHead: probe attends to x, then y + mlp(LayerNorm(y)), first (only) token.
    head = filled(lambda: layers.MAPHead(16, 2, 32, act="quick_gelu", ln_eps=1e-6,
                                         rngs=nnx.Rngs(0)), seed=9, scale=0.3)
    x = np.random.RandomState(4).randn(2, 5, 16)
    p = np_params(head)
    probe = np.broadcast_to(p["probe"], (2, 1, 16))
    y = np_mha(probe, x, p, "attn", 2, False)
    h = np_act(np_ln(y, p, "norm", 1e-6) @ p["mlp.fc1.kernel"] + p["mlp.fc1.bias"], "quick_gelu")
    want = (y + h @ p["mlp.fc2.kernel"] + p["mlp.fc2.bias"])[:, 0]
    np.testing.assert_allclose(np.asarray(run(head, jnp.asarray(x, jnp.float32))), want,
                               atol=2e-5, rtol=1e-4)


def test_patch_embed_matches_strided_conv():
    from vlm_jax.models.vit import PatchEmbed  # pylint: disable=import-outside-toplevel
    pe = filled(lambda: PatchEmbed(4, 10, use_bias=True, rngs=nnx.Rngs(0)), seed=1)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 12, 8, 3), jnp.float32)
    want = jax.jit(lambda x, k, b: jax.lax.conv_general_dilated(
        x, k, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)(
            x, pe.kernel[...], pe.bias[...])
    np.testing.assert_allclose(np.asarray(run(pe, x)), np.asarray(want).reshape(2, 6, 10),
                               atol=1e-5, rtol=1e-5)


def test_layernorm_and_gelu_variants():
    ln = filled(lambda: layers.LayerNorm(6, eps=1e-6, rngs=nnx.Rngs(0)), seed=5)
    x = np.random.RandomState(2).randn(3, 6) * 5 + 2
    p = {"n." + k: v for k, v in np_params(ln).items()}
    np.testing.assert_allclose(np.asarray(run(ln, jnp.asarray(x, jnp.float32))),
                               np_ln(x, p, "n", 1e-6), atol=1e-5, rtol=1e-5)
    z = np.linspace(-4, 4, 11)
    acts = jax.jit(lambda z: (layers.activation("quick_gelu")(z), layers.activation("gelu")(z)))
    quick, exact = acts(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(quick), np_act(z, "quick_gelu"), atol=1e-6)
    np.testing.assert_allclose(np.asarray(exact), np_act(z, "gelu"), atol=1e-6)
    with pytest.raises(ValueError, match="swish2"):
        layers.activation("swish2")


@pytest.mark.parametrize("with_bias,dtype", [(True, "float32"), (False, "float32"),
                                              (True, "bfloat16")])
def test_layer_norm_gradient_matches_central_differences(with_bias, dtype):
    """layers.layer_norm's hand-written gradient (x, scale, bias) against float64 central
    differences of a numpy layer norm, through a random cotangent, on [2, 3, 8] inputs."""
    rs = np.random.RandomState(4)
    x = rs.randn(2, 3, 8) * 3 + 1
    scale, bias, cot = 1 + 0.3 * rs.randn(8), 0.2 * rs.randn(8), rs.randn(2, 3, 8)
    eps = 1e-5

    def np_loss(x, scale, bias):
        m = x.mean(-1, keepdims=True)
        y = (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * scale
        return float(np.sum((y + bias) * cot))

    def numeric(i):
        args, h = [x, scale, bias], 1e-6
        g = np.zeros_like(args[i])
        for idx in np.ndindex(g.shape):
            hi = [a.copy() for a in args]
            lo = [a.copy() for a in args]
            hi[i][idx] += h
            lo[i][idx] -= h
            g[idx] = (np_loss(*hi) - np_loss(*lo)) / (2 * h)
        return g

    xj = jnp.asarray(x, dtype)
    loss = lambda x_, s_, b_: jnp.sum(  # noqa: E731
        layers.layer_norm(x_, s_, b_ if with_bias else None, eps) * cot)
    gx, gs, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        xj, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    assert gx.dtype == xj.dtype
    # The reference at the input the layer saw (bfloat16-rounded for the bfloat16 case).
    x = np.asarray(xj.astype(jnp.float32), np.float64)
    tol = 1e-4 if dtype == "float32" else 2e-2  # bfloat16: the input gradient's rounding
    np.testing.assert_allclose(np.asarray(gx, np.float64), numeric(0), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(gs), numeric(1), atol=1e-4, rtol=1e-4)
    if with_bias:
        np.testing.assert_allclose(np.asarray(gb), numeric(2), atol=1e-4, rtol=1e-4)
    else:
        assert gb is None or not np.any(np.asarray(gb))


# ------------------------------------------------------------------------------------------
# Towers against numpy references.
# ------------------------------------------------------------------------------------------


def test_clip_towers_match_numpy_reference():
    model = filled(lambda: build_model(tiny_clip_cfg(), rngs=nnx.Rngs(0)), seed=7, scale=0.2)
    rs = np.random.RandomState(3)
    images = rs.randn(2, 16, 16, 3)
    # CLIP tokenizer layout: sot, words, eot (the largest id), zero padding.
    tokens = np.array([[48, 5, 7, 49, 0, 0, 0, 0], [48, 3, 3, 3, 9, 11, 49, 0]], np.int32)
    pi = np_params(model.image)
    pt = np_params(model.text)
    want_img = np_vit_clip(images, pi, patch=8, depth=2, heads=2, act="quick_gelu", eps=1e-5)
    want_txt = np_text_clip(tokens, pt, depth=2, heads=3, act="quick_gelu", eps=1e-5)
    got_img, got_txt, got_emb = nnx.jit(lambda m, i, t: (m.image(i), m.text(t),
                                                         m.encode_image(i)))(
        model, jnp.asarray(images, jnp.float32), jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got_img), want_img, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got_txt), want_txt, atol=1e-4, rtol=1e-4)
    # Full CLIP embedding: projection + L2 normalisation.
    proj = np.asarray(model.image_projection.kernel[...], np.float64)
    e = want_img @ proj
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got_emb), e, atol=1e-4)


def test_text_pools_at_first_eos_and_is_causal():
    model = filled(lambda: TextTransformer(width=16, depth=2, num_heads=2, mlp_dim=32,
                                           vocab_size=20, context_length=6, eos_id=19,
                                           rngs=nnx.Rngs(0)), seed=4, scale=0.3)
    base = jnp.array([[1, 2, 19, 0, 0, 0], [3, 4, 5, 6, 19, 0]], jnp.int32)
    out = run(model, base)
    np.testing.assert_array_equal(np.asarray(model.pool_index(base)), [2, 4])
    # After the eos: the causal mask makes them irrelevant (even a second eos).
    after = base.at[0, 3:].set(jnp.array([7, 19, 8])).at[1, 5].set(11)
    np.testing.assert_allclose(np.asarray(run(model, after)), np.asarray(out), atol=1e-6)
    # Before the eos: output changes.
    before = base.at[0, 1].set(9).at[1, 0].set(9)
    diff = np.abs(np.asarray(run(model, before)) - np.asarray(out)).max(-1)
    assert (diff > 1e-3).all()
    # Shorter sequences use the first positions; no eos -> last token.
    assert shape_of(lambda m, t: m(t), model, base[:, :3]) == (2, 16)
    np.testing.assert_array_equal(np.asarray(model.pool_index(jnp.ones((1, 4), jnp.int32))), [3])
    with pytest.raises(ValueError, match="7 exceeds context_length 6"):
        shape_of(lambda m, t: m(t), model, jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        shape_of(lambda m, t: m(t), model, jnp.zeros((1, 6), jnp.float32))


# ------------------------------------------------------------------------------------------
# ViT shapes and errors.
# ------------------------------------------------------------------------------------------


def test_vit_output_shapes_and_errors():
    x = jnp.ones((2, 8, 8, 3))
    call = lambda m, x: m(x)  # noqa: E731
    for pool in ("tok", "gap", "map"):
        assert shape_of(call, nnx.eval_shape(lambda: tiny_vit(pool_type=pool)), x) == (2, 32)
    vit = filled(lambda: tiny_vit(num_classes=7))
    out = run(vit, x)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    assert vit.pos_embed.shape == (5, 32)
    assert nnx.eval_shape(lambda: tiny_vit(pool_type="gap")).pos_embed.shape == (4, 32)
    ti = nnx.eval_shape(lambda: ViT("Ti/4", image_size=8, rngs=nnx.Rngs(0)))
    assert shape_of(call, ti, x) == (2, 192)
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        shape_of(call, vit, jnp.ones((2, 3, 8, 8)))  # NCHW
    with pytest.raises(ValueError, match="10x10 is not divisible by patch_size 4"):
        shape_of(call, vit, jnp.ones((2, 10, 10, 3)))
    with pytest.raises(ValueError, match="12x12 differs from the image_size 8x8"):
        shape_of(call, vit, jnp.ones((2, 12, 12, 3)))
    with pytest.raises(ValueError, match="image_size 10x10 is not divisible by patch_size 4"):
        nnx.eval_shape(lambda: tiny_vit(image_size=10))
    with pytest.raises(ValueError, match="pool_type"):
        nnx.eval_shape(lambda: tiny_vit(pool_type="max"))
    with pytest.raises(ValueError, match="remat"):
        nnx.eval_shape(lambda: tiny_vit(remat="some"))


def test_build_model_config_errors_and_configdict():
    cfg = tiny_clip_cfg()
    cfg["image"]["foo"] = 1
    with pytest.raises(ValueError, match="model.image.foo"):
        build_model(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.bar"):
        build_model(dict(tiny_clip_cfg(), bar=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'coca2'.*available.*'clip', 'coca'"):
        build_model(dict(name="coca2"), rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: build_model(ml_collections.ConfigDict(tiny_clip_cfg()),
                                                rngs=nnx.Rngs(0)))
    assert isinstance(model, CLIP)


# ------------------------------------------------------------------------------------------
# dtype, remat, scan.
# ------------------------------------------------------------------------------------------

IMAGES = jnp.asarray(np.random.RandomState(1).rand(2, 16, 16, 3), jnp.float32)
TOKENS = jnp.array([[48, 5, 7, 49, 0, 0, 0, 0], [48, 3, 3, 3, 9, 11, 49, 0]], jnp.int32)


def shared_clip_cfg(**top):
    """Tiny CLIP whose towers share shapes, so a real initialisation needs few compiles."""
    cfg = tiny_clip_cfg(embed_dim=32, **top)
    cfg["image"].update(width=32, num_heads=2, mlp_dim=64)
    cfg["text"].update(width=32, num_heads=2, mlp_dim=64)
    return cfg


@pytest.fixture(scope="module")
def clip_model():
    """A really initialised tiny CLIP (later builds of the same shapes reuse the compiles)."""
    return build_model(shared_clip_cfg(), rngs=nnx.Rngs(0))


def test_bfloat16_close_to_float32(clip_model):
    bf16 = build_model(shared_clip_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
    # Same seed -> same float32 parameters whatever the compute dtype.
    for x, y in zip(jax.tree.leaves(nnx.state(clip_model)), jax.tree.leaves(nnx.state(bf16))):
        assert y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    a, b = run(clip_model, IMAGES, TOKENS), run(bf16, IMAGES, TOKENS)
    for k in ("image_emb", "text_emb"):
        assert b[k].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), atol=3e-2)
        assert np.abs(np.asarray(b[k]) - np.asarray(a[k])).max() > 0  # really ran in bf16


def _encoder(remat="none", scan=False, causal=False):
    return filled(lambda: layers.Encoder(2, 16, 2, 32, act="quick_gelu", causal=causal,
                                         remat=remat, scan_layers=scan, rngs=nnx.Rngs(0)),
                  seed=11, scale=0.3)


X_SEQ = jnp.asarray(np.random.RandomState(5).randn(2, 5, 16), jnp.float32)


@nnx.jit
def _losses_and_grads(encoders):
    """(loss, grads) of each encoder, in one compiled program (compiles are the slow part)."""
    return [nnx.value_and_grad(lambda e: jnp.sum(jnp.sin(e(X_SEQ))))(e) for e in encoders]


def _assert_grads_close(g0, g1):
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(leaves0) == len(leaves1)
    scale = max(np.abs(np.asarray(x)).max() for x in leaves0)
    for x, y in zip(leaves0, leaves1):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5 * scale, rtol=0)


def test_remat_same_outputs_and_grads():
    policies = ["none", "full", "dots_saveable"]
    results = _losses_and_grads([_encoder(remat=r) for r in policies])
    (l0, g0), others = results[0], results[1:]
    for (l1, g1) in others:
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
        _assert_grads_close(g0, g1)


def _stack(unrolled_blocks):
    """Pure dict of the block params stacked along a new leading axis."""
    states = [nnx.state(b, nnx.Param).to_pure_dict() for b in unrolled_blocks]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def test_scan_layers_matches_unrolled():
    unrolled = _encoder(causal=True)
    scanned = [_encoder(remat=r, scan=True, causal=True) for r in ("none", "full")]
    for enc in scanned:
        k = enc.blocks.attn.query.kernel
        assert k.shape == (2, 16, 2, 8)
        # Copy values only (a State would also carry the unstacked sharding metadata).
        state = nnx.state(enc.blocks, nnx.Param)
        nnx.replace_by_pure_dict(state, _stack(unrolled.blocks))
        nnx.update(enc.blocks, state)
        assert k.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "kv")
    (l0, g0), *rest = _losses_and_grads([unrolled] + scanned)
    g0 = _stack([g0["blocks"][i] for i in range(2)])
    for l1, g1 in rest:
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
        _assert_grads_close(g0, g1["blocks"].to_pure_dict())


def test_scanned_clip_structure():
    model = nnx.eval_shape(lambda: build_model(tiny_clip_cfg(scan_layers=True, remat="full"),
                                               rngs=nnx.Rngs(0)))
    assert model.text.encoder.blocks.mlp.fc1.kernel.shape == (2, 24, 48)
    assert count_params(model) == count_params(
        nnx.eval_shape(lambda: build_model(tiny_clip_cfg(), rngs=nnx.Rngs(0))))
    out = shape_of(lambda m, i, t: m(i, t), model, IMAGES, TOKENS)
    assert out == dict(image_emb=(2, 16), text_emb=(2, 16), logit_scale=())


# ------------------------------------------------------------------------------------------
# CLIP head.
# ------------------------------------------------------------------------------------------


def test_clip_outputs_normalised_and_logit_scale_exponentiated(clip_model):
    model = nnx.clone(clip_model)
    out = run(model, IMAGES, TOKENS)
    assert out["image_emb"].shape == (2, 32) and out["text_emb"].shape == (2, 32)
    for k in ("image_emb", "text_emb"):
        assert out[k].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out[k]), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(out["logit_scale"]), 1 / 0.07, rtol=1e-5)
    np.testing.assert_allclose(float(model.logit_scale[...]), math.log(1 / 0.07), rtol=1e-6)
    assert model.logit_scale.shape == ()
    assert model.logit_scale.get_metadata()["out_sharding"] == ()
    # The forward pass exponentiates the parameter as it is (open_clip); the bound is applied
    # to the parameter after each update (tests/test_microbatch.py), not here.
    model.logit_scale.set_value(jnp.asarray(5.0, jnp.float32))
    np.testing.assert_allclose(float(run(model, IMAGES, TOKENS)["logit_scale"]), math.exp(5.0),
                               rtol=1e-5)
    params = {"logit_scale": jnp.asarray(7.0), "image": {}}
    clamp = get_family("clip").after_update
    cfg = ml_collections.ConfigDict({"model": {"logit_scale_max": math.log(100.0)}})
    assert float(clamp(params, cfg)["logit_scale"]) == np.float32(math.log(100.0))
    assert float(clamp(dict(params, logit_scale=jnp.asarray(-3.0)), cfg)["logit_scale"]) == 0.0


def test_sharded_forward_matches_single_device(clip_model):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    want = run(clip_model, IMAGES, TOKENS)
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(clip_model)
    shardings = parallel.state_shardings(state, mesh, parallel.DEFAULT_RULES)
    state = jax.device_put(state.to_pure_dict(), shardings)

    def fwd(state, images, tokens):
        with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
            return nnx.merge(graphdef, state)(images, tokens)

    got = jax.jit(fwd)(state, jnp.tile(IMAGES, (2, 1, 1, 1)), jnp.tile(TOKENS, (2, 1)))
    for k in ("image_emb", "text_emb"):
        np.testing.assert_allclose(np.asarray(got[k][:2]), np.asarray(want[k]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[k][2:]), np.asarray(want[k]), atol=1e-5)


def test_normalize_pixels_matches_numpy_reference():
    """Every pipeline ships uint8 pixels; the device normalises them: (x / 255 - mean) / std
    with OpenAI CLIP's statistics (written out here, not read from the code), in float64 numpy,
    within 1e-6 over all 256 values of each channel."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = np.broadcast_to(np.arange(256)[:, None], (256, 3)).astype(np.uint8)[None]
    got = np.asarray(jax.jit(layers.normalize_pixels)(jnp.asarray(pixels)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, (pixels / 255.0 - mean) / std, atol=1e-6, rtol=0)
    # The model's dtype is the output dtype; float input is taken as already normalised.
    assert layers.normalize_pixels(jnp.asarray(pixels), jnp.bfloat16).dtype == jnp.bfloat16
    np.testing.assert_array_equal(layers.normalize_pixels(jnp.asarray(got)), got)


def test_uint8_pixels_are_normalised_on_device_like_the_float_reference():
    """The image tower given uint8 pixels equals the tower given the numpy-normalised float
    image (what float-fed callers, e.g. the open_clip parity tests, pass)."""
    from flax import nnx as _nnx

    from vlm_jax.models.clip import clip_config

    cfg = clip_config("ViT-B/32")
    cfg["image"].update(image_size=32, width=32, depth=1, num_heads=2, mlp_dim=64)
    cfg["text"].update(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=64,
                       context_length=8, eos_id=63)
    cfg["embed_dim"] = 16
    model = build_model(cfg, rngs=_nnx.Rngs(0))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    host = ((pixels / 255.0 - mean) / std).astype(np.float32)
    np.testing.assert_allclose(model.encode_image(jnp.asarray(pixels)),
                               model.encode_image(jnp.asarray(host)), atol=1e-5)


# ------------------------------------------------------------------------------------------
# The language model's layer stack: scanned equals unrolled.
# ------------------------------------------------------------------------------------------


def _lm_pair(style, remat="none"):
    """An unrolled LM with random weights and the same LM with scanned (stacked) layers."""
    from vlm_jax.models.lm import LanguageModel  # pylint: disable=import-outside-toplevel
    kw = dict(style=style, vocab_size=40, width=16, depth=3, num_heads=4,
              num_kv_heads=2 if style == "llama" else 0, mlp_dim=32, max_length=24, bos_id=1,
              eos_id=2)
    unrolled = filled(lambda: LanguageModel(**kw, rngs=nnx.Rngs(0)), seed=7, scale=0.3)
    scanned = LanguageModel(**kw, scan_layers=True, remat=remat, rngs=nnx.Rngs(1))
    assert scanned.blocks.attn.key.kernel.shape == (3, 16, kw["num_kv_heads"] or 4, 4)
    state = nnx.state(scanned, nnx.Param)
    pure = nnx.state(unrolled, nnx.Param).to_pure_dict()
    pure["blocks"] = _stack(unrolled.blocks)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(scanned, state)
    return unrolled, scanned


@pytest.mark.parametrize("style,remat", [("llama", "full"), ("gpt2", "none")])
def test_scanned_lm_equals_unrolled_logits_and_cached_decoding(style, remat):
    from vlm_jax import decoding  # pylint: disable=import-outside-toplevel
    unrolled, scanned = _lm_pair(style, remat)
    rs = np.random.RandomState(3)
    tokens = jnp.asarray(rs.randint(3, 40, (2, 9)), jnp.int32)
    valid = jnp.arange(9)[None] >= jnp.array([[0], [4]])  # the second row left-padded

    @nnx.jit
    def run_all(m):
        logits = m(tokens, valid)
        cache = m.init_cache(2, 14)
        step_logits, cache = m.step(tokens, cache, valid)
        one, cache = m.step(tokens[:, :1], cache)
        return logits, step_logits, one, decoding.greedy(m, prompt=tokens, prompt_valid=valid,
                                                         max_new_tokens=4)

    want, got = run_all(unrolled), run_all(scanned)
    for w, g in zip(want[:3], got[:3]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
    # The cached prompt step equals the full forward at the valid positions.
    np.testing.assert_allclose(np.asarray(got[1])[np.asarray(valid)],
                               np.asarray(got[0])[np.asarray(valid)], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))
