"""Flamingo assembled: frozen-LM equality at initialisation, media masking through the model,
KV-cached generation, frozen training, and 8-device steps equal to one device."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vlm_jax import config as config_lib
from vlm_jax import decoding, parallel, train
from vlm_jax.models.flamingo import Flamingo

V = 40  # LM vocabulary; <image> = 40, <|endofchunk|> = 41
IMG, EOC = V, V + 1


def _model(cross_attn_every=1, depth=2, style="llama", seed=0, scan_layers=False):
    return Flamingo(
        vision=dict(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64),
        lm=dict(style=style, vocab_size=V, width=32, depth=depth, num_heads=4, num_kv_heads=2
                if style == "llama" else 0, mlp_dim=64, max_length=64, bos_id=2, eos_id=3,
                scan_layers=scan_layers),
        resampler=dict(depth=1, num_latents=4, num_heads=2), cross_attn=dict(num_heads=2),
        cross_attn_every=cross_attn_every, rngs=nnx.Rngs(seed))


def _open_gates(model, value=1.0):
    for block in model.xattn:
        block.attn_gate[...] = jnp.asarray(value)
        block.ff_gate[...] = jnp.asarray(value)


# [bos] <image> a b <eoc> <image> c d e <eoc> [eos] pad
TOKENS = jnp.array([[2, IMG, 5, 6, EOC, IMG, 7, 8, 9, EOC, 3, 0],
                    [2, 11, IMG, 12, 13, 14, EOC, IMG, 15, EOC, 3, 0]])


def _images(seed=0, b=2, t=2):
    return jax.random.normal(jax.random.key(seed), (b, t, 32, 32, 3))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_logits_equal_the_frozen_lm_at_initialisation(style):
    model = _model(style=style)
    # Text only: the LM's own logits, exactly.
    text = jnp.array([[2, 5, 6, 7, 3, 0], [2, 9, 9, 3, 0, 0]])
    got = model(_images(t=1), text)
    np.testing.assert_array_equal(np.asarray(got[..., :V]), np.asarray(model.lm(text)))
    # With images and the new tokens (their embeddings are new): the LM fed the same
    # embeddings, exactly; the gates are 0, so no visual information reaches the text.
    got = model(_images(), TOKENS)
    ref = model.lm(TOKENS, embeddings=model.embed_tokens(TOKENS))
    np.testing.assert_array_equal(np.asarray(got[..., :V]), np.asarray(ref))
    other = model(_images(seed=1), TOKENS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(other))
    # New token outputs start at 0 (zero-initialised rows).
    np.testing.assert_array_equal(np.asarray(got[..., V:]), 0.0)


def _chunk_of(tokens):
    """Index of the image each position is in (0 = before the first image)."""
    return np.cumsum(np.asarray(tokens) == IMG, axis=1)


def test_changing_an_image_changes_only_the_text_it_precedes():
    """Through the model, image k changes no logit before its <image> token and every logit of
    the text it precedes. (Text after the next image still sees image k indirectly, through the
    LM's self-attention over the earlier text, as in Flamingo.) Within a cross-attention block,
    the update of each position depends on the latest image only."""
    model = _model()
    _open_gates(model)
    images = _images()
    base = np.asarray(model(images, TOKENS))
    chunk = _chunk_of(TOKENS)
    for k in range(2):
        changed = images.at[:, k].set(jax.random.normal(jax.random.key(9), (2, 32, 32, 3)))
        diff = np.abs(np.asarray(model(changed, TOKENS)) - base).max(-1)
        before = chunk <= k  # positions before image k's <image> token
        assert np.all(diff[before] == 0), (k, diff)
        assert np.all(diff[chunk == k + 1] > 1e-6), (k, diff)  # the text after image k
    # Directly, in a cross-attention block: each position's update reads only the latest image.
    block = model.xattn[0]
    x = jax.random.normal(jax.random.key(3), (2, TOKENS.shape[1], 32))
    media = model.encode_media(images)
    ref = np.asarray(block(x, media, TOKENS == IMG))
    for k in range(2):
        media2 = media.at[:, k].multiply(-3.0)
        diff = np.abs(np.asarray(block(x, media2, TOKENS == IMG)) - ref).max(-1)
        assert np.all(diff[chunk != k + 1] == 0), (k, diff)
        assert np.all(diff[chunk == k + 1] > 1e-6), (k, diff)


def test_kv_cached_steps_and_generation_match_the_full_forward():
    model = _model(cross_attn_every=2, depth=4)
    _open_gates(model, 0.7)
    images = _images()
    full = np.asarray(model(images, TOKENS))
    media = model.encode_media(images)
    cache = model.init_cache(2, 16, media)
    outs = []
    logits, cache = model.step(TOKENS[:, :3], cache)
    outs.append(logits)
    for t in range(3, TOKENS.shape[1]):
        logits, cache = model.step(TOKENS[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5)

    # Greedy with a left-padded prompt == argmax loop over full forwards of the unpadded rows.
    prompts = [[2, IMG, 5, 6, EOC, IMG], [2, 11, IMG]]
    width = max(map(len, prompts))
    tok = np.zeros((2, width), np.int32)
    valid = np.zeros((2, width), bool)
    for i, p in enumerate(prompts):
        tok[i, width - len(p):], valid[i, width - len(p):] = p, True
    got = np.asarray(decoding.generate(model, images, prompt=tok, prompt_valid=valid,
                                       max_new_tokens=5))[:, width:]
    for i, p in enumerate(prompts):
        seq = list(p)
        for _ in range(5):
            nxt = int(jnp.argmax(model(images[i:i + 1], jnp.asarray([seq]))[0, -1]))
            seq.append(nxt)
            if nxt in (EOC, 3):
                break
        want = seq[len(p):]
        assert got[i, :len(want)].tolist() == want
        assert np.all(got[i, len(want):] == 0)  # pad after the stop token


def test_scanned_lm_layers_between_cross_attention_equal_unrolled():
    """``lm.scan_layers``: the LM runs as one scan per group of layers between the
    cross-attention blocks; logits and cached greedy generation equal the unrolled model."""
    unrolled = _model(cross_attn_every=2, depth=5)
    _open_gates(unrolled, 0.7)
    scanned = _model(cross_attn_every=2, depth=5, scan_layers=True)
    assert scanned.lm.blocks.attn.query.kernel.shape[0] == 5
    pure = nnx.state(unrolled, nnx.Param).to_pure_dict()
    blocks = [pure["lm"]["blocks"][i] for i in range(5)]
    pure["lm"]["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(scanned, state)
    images = _images()
    valid = jnp.ones((2, 8), bool)

    @nnx.jit
    def run(m):
        return m(images, TOKENS), decoding.generate(m, images, prompt=TOKENS[:, :8],
                                                    prompt_valid=valid, max_new_tokens=4,
                                                    jit=False)

    (want, want_gen), (got, got_gen) = run(unrolled), run(scanned)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got_gen), np.asarray(want_gen))


FLAMINGO = "experiments/flamingo_tiny_shapes.py:test"


def _config(repo_root, *overrides):
    path, _, arg = FLAMINGO.partition(":")
    return config_lib.load_config(f"{repo_root / path}:{arg}", list(overrides))


def _batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    lm = config.model.lm
    b, length, size = config.batch_size, lm.max_length, config.model.vision.image_size
    out = []
    for _ in range(n):
        tokens = rng.integers(4, lm.vocab_size, size=(b, length)).astype(np.int32)
        tokens[:, 0] = lm.bos_id
        for pos in (1, 9, 20):  # three images per document
            tokens[:, pos] = lm.vocab_size
        tokens[:, 30:] = 0
        weights = ((tokens != 0) & (tokens != lm.vocab_size)).astype(np.float32)
        weights[:, 0] = 0
        out.append({"tokens": tokens, "weights": weights,
                    "images": rng.normal(size=(b, 5, size, size, 3)).astype(np.float32)})
    return out


def _steps(config, mesh, batches):
    s = train.setup(config, mesh)
    step = train.make_train_step(s, {k: v.shape for k, v in batches[0].items()})
    state = s.init_fn()
    first = jax.device_get(state["params"])
    losses = []
    for b in batches:
        state, m = step(state, parallel.make_global_batch(b, mesh))
        losses.append(float(m["train/loss"]))
    return np.array(losses), first, jax.device_get(state), s


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_train_steps_match_one_device_and_train_only_the_bridge(repo_root, mesh_shape):
    config = _config(repo_root)
    batches = _batches(config, 3)
    ref, first, ref_state, _ = _steps(config, parallel.create_mesh({}, jax.devices()[:1]),
                                      batches)
    got, _, state, s = _steps(config, parallel.create_mesh(mesh_shape), batches)
    assert ref[0] != ref[1]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    flat = dict(jax.tree_util.tree_flatten_with_path(state["params"])[0])
    ref_flat = dict(jax.tree_util.tree_flatten_with_path(ref_state["params"])[0])
    for path, x0 in jax.tree_util.tree_flatten_with_path(first)[0]:
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(flat[path], ref_flat[path], atol=1e-5, err_msg=name)
        top = path[0].key
        if top in ("vision", "lm"):  # frozen: bit for bit
            np.testing.assert_array_equal(flat[path], x0, err_msg=name)
    for name in ("extra_embed",):
        assert not np.array_equal(state["params"][name], first[name])
    assert not np.array_equal(state["params"]["xattn"][0]["attn_gate"],
                              first["xattn"][0]["attn_gate"])
    # The optimizer keeps moments only for the trained parameters.
    n_moments = sum(x.size for x in jax.tree.leaves(state["opt_state"])
                    if np.issubdtype(x.dtype, np.floating))  # not the int step counts
    trained = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(first)[0]
                  if p[0].key not in ("vision", "lm"))
    assert n_moments == 2 * trained


def test_trainable_pattern_errors_and_freezing_in_optax(repo_root):
    from vlm_jax import optim

    config = _config(repo_root, "optim.trainable=(unclosed")
    with pytest.raises(config_lib.ConfigError, match="optim.trainable"):
        train.setup(config, parallel.create_mesh({}, jax.devices()[:1]))
    # The frozen label really is optax.set_to_zero: reference = plain AdamW on the trained
    # parameter only.
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((3,))}
    grads = {"a": jnp.full((2, 2), 0.5), "b": jnp.full((3,), 0.5)}
    cfg = config_lib.load_config(f"{repo_root / 'experiments/lm_tiny_shapes.py'}:test",
                                 ["optim.trainable=^a$", "optim.grad_clip_norm=0.0"])
    tx, _ = optim.make_optimizer(cfg.optim, cfg.total_steps)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)
    ref_tx = optax.adamw(optim.make_schedule(cfg.optim, cfg.total_steps), b1=cfg.optim.b1,
                         b2=cfg.optim.b2, eps=cfg.optim.eps,
                         weight_decay=cfg.optim.weight_decay)
    ref, _ = ref_tx.update({"a": grads["a"]}, ref_tx.init({"a": params["a"]}), {"a": params["a"]})
    np.testing.assert_allclose(np.asarray(updates["a"]), np.asarray(ref["a"]), rtol=1e-6)
