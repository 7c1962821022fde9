"""Tests of the CoCa model (vlm_jax.models.coca) and caption decoding (vlm_jax.decoding).

References: open_clip 3.3's CoCa run in a subprocess of the torch venv (skipped without it),
parameter counts and FLOPs computed here from the config, numpy cross-entropy and nucleus,
full recomputation for the KV cache, and greedy decoding for beam 1 / top-k 1.
"""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlm_jax  # noqa: F401  (disables eager sharding)
from tests.model_fixtures import randomize
from vlm_jax import convert, decoding, parallel
from vlm_jax.families import FAMILIES, get_family
from vlm_jax.models import count_params
from vlm_jax.models.coca import captioning_loss, coca_config

VOCAB, LENGTH, BOS, EOS, PAD = 40, 8, 1, 30, 0


def tiny_cfg(**top):
    cfg = dict(
        name="coca", embed_dim=16,
        image=dict(width=24, depth=2, num_heads=2, mlp_dim=96, patch_size=8, image_size=16),
        text=dict(width=16, depth=2, num_heads=2, mlp_dim=64, vocab_size=VOCAB,
                  context_length=LENGTH, bos_id=BOS, eos_id=EOS, pad_id=PAD, act="gelu"),
        decoder=dict(depth=2, num_heads=4, mlp_dim=64),
        pooler=dict(n_queries=5, num_heads=2),
        dtype="float32", remat="none", scan_layers=False)
    cfg.update(top)
    return cfg



def abstract(cfg):
    return nnx.eval_shape(lambda: get_family(cfg).build_model(cfg, nnx.Rngs(0)))


B = 4  # divisible by the 4 batch shards of the mesh test
IMAGES = jnp.asarray(np.random.RandomState(1).randn(B, 16, 16, 3), jnp.float32)
TOKENS = jnp.asarray([[BOS, 5, 6, 7, EOS, PAD, PAD, PAD],
                      [BOS, PAD, 9, EOS, PAD, PAD, PAD, PAD],  # a pad id inside the text
                      [BOS, 4, 9, 11, 12, 13, 14, EOS],
                      [BOS, 3, EOS, 12, PAD, PAD, PAD, PAD]], jnp.int32)
PARITY_TOKENS = np.array(TOKENS)
PARITY_TOKENS[0, 6] = 17  # eos then a non-pad token: the legacy mask reads token j-1 for key j


def stacked_copy(model, cfg):
    """The model built with ``cfg`` (scan_layers=True) holding ``model``'s parameters, the
    unrolled ``blocks.{i}`` stacked along the leading 'layers' axis."""
    flat = {tuple(str(k) for k in p): v.get_value()
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    scanned = abstract(cfg)
    state = nnx.state(scanned, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(k) for k in path)
        if path in flat:
            var.set_value(flat[path])
            continue
        i = path.index("blocks") + 1
        n = var.get_value().shape[0]
        var.set_value(jnp.stack([flat[path[:i] + (str(j),) + path[i:]] for j in range(n)]))
    nnx.update(scanned, state)
    return scanned


@pytest.fixture(scope="module")
def model():
    # With this seed greedy rows end at different steps (eos at 4, 2, 4; see the test).
    return randomize(abstract(tiny_cfg()), seed=0, scale=0.3)


@nnx.jit
def forward(m, images, tokens):
    return m(images, tokens)


def gen(m, **kw):
    return np.asarray(decoding.generate(m, IMAGES, **kw))


# ------------------------------------------------------------------------------------------
# Shapes, parameter count, FLOPs.
# ------------------------------------------------------------------------------------------


def test_output_shapes_and_api(model):
    out = forward(model, IMAGES, TOKENS)
    assert {k: v.shape for k, v in out.items()} == dict(
        image_emb=(B, 16), text_emb=(B, 16), logit_scale=(), caption_logits=(B, LENGTH, VOCAB))
    for k in ("image_emb", "text_emb"):
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out[k]), axis=-1), 1, atol=1e-5)
    shapes = lambda fn, *a: jax.tree.map(lambda x: x.shape, nnx.eval_shape(fn, *a))  # noqa: E731
    assert shapes(lambda m, i: m.encode_image(i), model, IMAGES) == (B, 16)
    assert shapes(lambda m, t: m.encode_text(t), model, TOKENS) == (B, 16)
    assert shapes(lambda m, i: m.image_context(i), model, IMAGES) == (B, 4, 16)  # n_queries-1
    assert shapes(lambda m, c, t: m.decode_logits(c, t), model, jnp.zeros((B, 4, 16)),
                  TOKENS) == (B, LENGTH, VOCAB)
    step = shapes(lambda m, c: m.decode_logits(None, TOKENS[:, :1],
                                                 cache=m.init_cache(B, context=c)),
                  model, jnp.zeros((B, 4, 16)))
    assert step[0] == (B, 1, VOCAB) and step[1]["dec_k"] == (2, B, LENGTH, 4, 4)
    par = abstract(tiny_cfg(pooler=dict(n_queries=5, num_heads=2, mode="parallel")))
    assert shapes(lambda m, i: m.image_context(i), par, IMAGES) == (B, 5, 16)
    with pytest.raises(ValueError, match="model.decoder.width"):
        abstract(tiny_cfg(decoder=dict(width=32)))
    with pytest.raises(ValueError, match="model.pooler.n_query"):
        abstract(tiny_cfg(pooler=dict(n_query=4)))


def _block(w, m):
    return 4 * w * w + 4 * w + 2 * w * m + m + w + 4 * w  # q k v out (+biases), mlp, 2 LNs


def expected_params(cfg):
    """Independent count from the config (open_clip's CoCa structure)."""
    e, im, tx, dec = cfg["embed_dim"], cfg["image"], cfg["text"], cfg["decoder"]
    mode, nq = cfg["pooler"].get("mode", "single"), cfg["pooler"]["n_queries"]
    iw, tw, p = im["width"], tx["width"], im["patch_size"]
    tokens = (im["image_size"] // p) ** 2 + 1

    def pooler(n, kv):
        return n * e + 2 * e + 2 * kv + (2 * e * e + 2 * kv * e + 4 * e)

    n = p * p * 3 * iw + iw + tokens * iw + 2 * iw + im["depth"] * _block(iw, im["mlp_dim"])
    if mode == "single":
        n += pooler(nq, iw) + 2 * e
    else:
        n += pooler(nq, iw) + pooler(1, iw if mode == "parallel" else e) + 2 * iw
    n += e * e  # visual.proj
    n += VOCAB * tw + tw + (LENGTH + 1) * tw + tx["depth"] * _block(tw, tx["mlp_dim"]) + 2 * tw
    n += tw * e  # text_projection
    cross = _block(tw, dec["mlp_dim"]) + 2 * e + 2 * (e - tw) * tw  # + ln_1_kv (+ kdim != w)
    n += dec["depth"] * (_block(tw, dec["mlp_dim"]) + cross) + 2 * tw + tw * VOCAB
    return n + 1  # logit_scale


@pytest.mark.parametrize("mode", ["single", "parallel", "cascade"])
def test_param_count_matches_independent_count(mode):
    cfg = tiny_cfg(pooler=dict(n_queries=5, num_heads=2, mode=mode))
    assert count_params(abstract(cfg)) == expected_params(cfg)
    scanned = abstract(dict(cfg, scan_layers=True, remat="full"))
    assert count_params(scanned) == expected_params(cfg)


@pytest.mark.parametrize("name,expected", [("coca_ViT-B-32", 253_560_065),
                                           ("coca_ViT-L-14", 638_450_177)])
def test_preset_param_counts_equal_open_clip(name, expected):
    # Sum of numel over open_clip.create_model(name).state_dict() (open_clip 3.3).
    assert "coca" in FAMILIES
    model = abstract(coca_config(name))
    assert count_params(model) == expected
    assert model.image.pooler.attn.key.kernel.shape[0] == model.image.width


def _dot_flops(jaxpr):
    """Matmul FLOPs (2 x MACs) of every dot_general in a jaxpr, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += mult * _dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += mult * _dot_flops(sub)
    return total


@pytest.mark.parametrize("mode", ["single", "cascade"])
def test_flops_equal_matmuls_of_the_traced_forward(mode):
    cfg = tiny_cfg(pooler=dict(n_queries=5, num_heads=2, mode=mode))
    m = abstract(cfg)
    graphdef, state = nnx.split(m)
    jaxpr = jax.make_jaxpr(lambda s, i, t: nnx.merge(graphdef, s)(i, t))(
        state, IMAGES[:1], TOKENS[:1])
    flops_per_example = get_family(cfg).flops_per_example
    assert flops_per_example(cfg) == _dot_flops(jaxpr.jaxpr) > 0
    assert flops_per_example(cfg, batch_size=8) == flops_per_example(cfg) + 2 * 8 * 16


# ------------------------------------------------------------------------------------------
# Captioning logits and loss.
# ------------------------------------------------------------------------------------------


def test_caption_logits_are_causal(model):
    base = np.asarray(forward(model, IMAGES, TOKENS)["caption_logits"])
    rs = np.random.RandomState(3)
    for t in (0, 2, 5):
        changed = np.array(TOKENS)
        changed[:, t + 1:] = rs.randint(0, VOCAB, size=changed[:, t + 1:].shape)
        changed[:, t + 1] = (np.array(TOKENS)[:, t + 1] + 7) % VOCAB  # surely different
        got = np.asarray(forward(model, IMAGES, jnp.asarray(changed))["caption_logits"])
        np.testing.assert_allclose(got[:, :t + 1], base[:, :t + 1], atol=1e-6)
        assert np.abs(got[:, t + 1] - base[:, t + 1]).max() > 1e-3  # the test can see changes


def test_captioning_loss_matches_numpy():
    rs = np.random.RandomState(0)
    logits = rs.randn(B, LENGTH, VOCAB).astype(np.float32) * 3
    tokens = np.array(TOKENS)
    # numpy: CrossEntropyLoss(ignore_index=pad) over logits[:, :-1] vs tokens[:, 1:].
    lg = logits[:, :-1].astype(np.float64)
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    labels = tokens[:, 1:]
    nll = [-logp[b, t, labels[b, t]] for b in range(B) for t in range(LENGTH - 1)
           if labels[b, t] != PAD]
    want = np.mean(nll)
    loss = jax.jit(captioning_loss, static_argnums=2)
    np.testing.assert_allclose(float(loss(logits, tokens, PAD)), want, rtol=1e-5)
    # open_clip's [B, L-1, V] logits give the same number; pad-only labels give 0.
    np.testing.assert_allclose(float(loss(logits[:, :-1], tokens, PAD)), want, rtol=1e-5)
    assert abs(float(loss(logits, tokens, 9)) - want) > 1e-3  # the pad id matters
    assert float(loss(logits, np.full_like(tokens, PAD), PAD)) == 0.0


# ------------------------------------------------------------------------------------------
# Decoding.
# ------------------------------------------------------------------------------------------


def _check_format(tokens):
    assert tokens.shape[1:] == (LENGTH,) and tokens.dtype == np.int32
    assert (tokens[:, 0] == BOS).all()
    for row in tokens:
        eos = np.flatnonzero(row == EOS)
        if eos.size:
            assert (row[eos[0] + 1:] == PAD).all()


TOP_P, TEMPERATURE, SAMPLE_COPIES = 0.6, 1.5, 4


@pytest.fixture(scope="module")
def decoded(model):
    """Every decode of the tests in one compiled program (XLA:CPU compiles cost seconds each):
    ``generate`` on graphdef + params inside the caller's jit, the lower-level functions on the
    same image context, and the teacher-forced logits of all decoded sequences (one full causal
    forward, the reference for the greedy / beam / nucleus checks)."""
    graphdef, state = nnx.split(model)
    scanned_def, scanned_state = nnx.split(
        stacked_copy(model, tiny_cfg(scan_layers=True, remat="full")))

    # Optimisation level 0 of the CPU backend: a third less compile time, same semantics.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(params, scanned_params, images):
        m = nnx.merge(graphdef, params)
        ctx = m.image_context(images)
        # Layers stacked and scanned (nnx.scan over the per-layer cache slices), with remat.
        scanned = nnx.merge(scanned_def, scanned_params)
        out = dict(scanned_context=scanned.image_context(images),
                   scanned_greedy=decoding.greedy(scanned, ctx))
        out.update(
            greedy=decoding.generate(graphdef, images, params=params, jit=False),
            greedy_nocache=decoding.greedy(m, ctx, use_cache=False),
            beam1=decoding.beam_search(m, ctx, beam_size=1, length_penalty=0.7)[0],
            beam3=decoding.beam_search(m, ctx, beam_size=3, early_stopping=False)[0],
            beam3_nocache=decoding.beam_search(m, ctx, beam_size=3, early_stopping=False,
                                               use_cache=False)[0])
        # One sampling loop, per-row settings: the first B rows top-k 1 (temperature 1), the
        # others the nucleus at TOP_P with TEMPERATURE.
        first = jnp.arange(B * SAMPLE_COPIES) < B
        sampled = decoding.sample(m, jnp.tile(ctx, (SAMPLE_COPIES, 1, 1)), jax.random.key(7),
                                  top_k=jnp.where(first, 1, 0),
                                  top_p=jnp.where(first, 1.0, TOP_P),
                                  temperature=jnp.where(first, 1.0, TEMPERATURE))
        out["topk1"], out["top_p"] = sampled[:B], sampled[B:]
        seqs = jnp.concatenate([out["greedy"], out["beam3"], out["top_p"]])
        logits = m.decode_logits(jnp.tile(ctx, (2 + SAMPLE_COPIES - 1, 1, 1)), seqs)
        out["logits_greedy"], out["logits_beam3"], out["logits_top_p"] = (
            logits[:B], logits[B:2 * B], logits[2 * B:])
        # Teacher forcing through the cache: a 3-token prefill, then one token per step.
        tokens = jnp.asarray(PARITY_TOKENS)
        first, cache = m.decode_logits(None, tokens[:, :3], cache=m.init_cache(B, context=ctx))

        def step(carry, tok):
            cache, p = carry
            logits, cache = nnx.merge(graphdef, p).decode_logits(None, tok[:, None], cache=cache)
            return (cache, p), logits[:, 0]

        _, rest = jax.lax.scan(step, (cache, params), tokens[:, 3:].T)
        out["stepped"] = jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)
        out["full"] = m.decode_logits(ctx, tokens)
        out["context"] = ctx
        return out

    return jax.tree.map(np.asarray, run(state.to_pure_dict(), scanned_state.to_pure_dict(),
                                        IMAGES))


def _end(row):
    """Index of the first eos (LENGTH if none)."""
    return int(np.flatnonzero(row == EOS)[0]) if (row == EOS).any() else LENGTH


def test_cached_teacher_forcing_equals_full_forward(decoded):
    # Padding inside the text and a token after pad: the cached key mask must follow the
    # legacy rule exactly as the full forward does.
    np.testing.assert_allclose(decoded["stepped"], decoded["full"], atol=1e-5)
    assert np.abs(decoded["full"]).max() > 1


def test_scanned_layers_decode_like_unrolled(decoded):
    np.testing.assert_allclose(decoded["scanned_context"], decoded["context"], atol=1e-5)
    np.testing.assert_array_equal(decoded["scanned_greedy"], decoded["greedy"])


def test_greedy_format_and_cache_equals_recompute(decoded):
    greedy = decoded["greedy"]
    _check_format(greedy)
    ends = [_end(r) for r in greedy]
    assert len(set(ends)) > 1 and min(ends) < LENGTH - 1, greedy  # rows stop apart
    np.testing.assert_array_equal(decoded["greedy_nocache"], greedy)
    # Greedy is the argmax of the teacher-forced logits of its own output.
    logits = decoded["logits_greedy"]
    for b, end in enumerate(ends):
        n = min(end, LENGTH - 1)
        np.testing.assert_array_equal(logits[b, :n].argmax(-1), greedy[b, 1:n + 1])


def test_beam_1_equals_greedy(model, decoded):
    np.testing.assert_array_equal(decoded["beam1"], decoded["greedy"])
    # The model-instance path of generate (traced only: its program is compiled elsewhere).
    out = jax.eval_shape(lambda: decoding.generate(model, IMAGES, method="beam", beam_size=1))
    assert out.shape == (B, LENGTH) and out.dtype == jnp.int32


def _normalised_logp(seqs, logits):
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    out = []
    for b, row in enumerate(seqs):
        n = min(_end(row), LENGTH - 1)
        out.append(sum(logp[b, t, row[t + 1]] for t in range(n)) / n)
    return np.array(out)


def test_beam_3_cache_equals_recompute_and_beats_greedy(decoded):
    beam = decoded["beam3"]
    _check_format(beam)
    np.testing.assert_array_equal(decoded["beam3_nocache"], beam)
    # Length-normalised log-probs from the teacher-forced logits: beam >= greedy per row.
    got = _normalised_logp(beam, decoded["logits_beam3"].astype(np.float64))
    ref = _normalised_logp(decoded["greedy"], decoded["logits_greedy"].astype(np.float64))
    assert (got >= ref - 1e-5).all(), (got, ref)
    assert (beam != decoded["greedy"]).any()  # beam search found something else somewhere


def test_top_k_1_sampling_equals_greedy(decoded):
    np.testing.assert_array_equal(decoded["topk1"], decoded["greedy"])


def test_top_p_samples_stay_in_the_nucleus(decoded):
    toks = decoded["top_p"]
    _check_format(toks)
    logits = decoded["logits_top_p"].astype(np.float64) / TEMPERATURE
    sizes = []
    for b, row in enumerate(toks):
        for t in range(min(_end(row), LENGTH - 1)):
            p = np.exp(logits[b, t] - logits[b, t].max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]
            nucleus = set(order[before < TOP_P + 1e-6].tolist())
            sizes.append(len(nucleus))
            assert row[t + 1] in nucleus, (b, t, row, sorted(nucleus))
    assert len(sizes) > 10 and min(sizes) < VOCAB // 2 and max(sizes) > 1  # the check has teeth
    assert len({r.tobytes() for r in toks.reshape(SAMPLE_COPIES - 1, B, -1)}) > 1  # random


def test_filters_and_errors():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
    inf = -np.inf
    for k in (2, jnp.asarray(2)):  # static and traced k
        np.testing.assert_array_equal(np.asarray(decoding.top_k_filter(logits, k)),
                                      [[inf, 3, inf, 2], [5, 1, 1, inf]])  # ties at k kept
    np.testing.assert_array_equal(np.asarray(decoding.top_k_filter(logits, jnp.asarray(0))),
                                  np.asarray(logits))
    # probs row 0: [.032, .644, .087, .237]; p=0.7 keeps 3 (cum before: 0, .644) and 2.
    got = np.asarray(decoding.top_p_filter(logits, 0.7))
    assert np.isfinite(got[0]).tolist() == [False, True, False, True]
    assert np.isfinite(got[1]).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="rng"):
        decoding.generate(nnx.Module(), IMAGES, method="sample")
    with pytest.raises(ValueError, match="top_p"):
        decoding.generate(nnx.Module(), IMAGES, method="greedy", top_p=0.5)


# ------------------------------------------------------------------------------------------
# Sharding.
# ------------------------------------------------------------------------------------------


def test_forward_on_8_device_mesh_equals_one_device(model):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    want = forward(model, IMAGES, TOKENS)  # compiled by test_output_shapes_and_api
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    shardings = parallel.state_shardings(state, mesh, parallel.DEFAULT_RULES)
    state = jax.device_put(state.to_pure_dict(), shardings)
    assert not state["decoder"]["vocab_projection"]["kernel"].sharding.is_fully_replicated

    def fwd(state, images, tokens):
        with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
            return nnx.merge(graphdef, state)(images, tokens)

    got = jax.jit(fwd)(state, IMAGES, TOKENS)
    for k in ("image_emb", "text_emb", "caption_logits", "logit_scale"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Parity with open_clip (weights converted with the mapping of the later import).
# ------------------------------------------------------------------------------------------

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "open_clip" / "tiny_coca.npz"


def test_matches_open_clip_coca():
    """A random open_clip 3.3 CoCa (tests/fixtures/open_clip/make_fixture.py), converted with
    ``vlm_jax.convert``: same embeddings and caption logits for the same inputs."""
    data = np.load(FIXTURE)
    sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    cfg = convert.infer_coca_config(sd, act="gelu", pooler_heads=2)
    for key in ("image", "text", "decoder"):  # inferred from the shapes alone
        for dim, want in tiny_cfg()[key].items():
            # Head counts follow open_clip's head width 64, which this tiny model does not use.
            if dim in cfg[key] and dim not in ("bos_id", "eos_id", "act", "num_heads"):
                assert cfg[key][dim] == want, (key, dim)
    flat = convert.convert_coca_state_dict(sd, tiny_cfg())
    m = abstract(tiny_cfg())
    state = nnx.state(m, nnx.Param)
    ours = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
    assert ours == set(flat)  # one-to-one: nothing missing, nothing left over
    params = convert.to_model_params(flat, state)
    nnx.update(m, params)
    np.testing.assert_array_equal(data["in/images"], np.asarray(IMAGES))
    got = forward(m, IMAGES, jnp.asarray(data["in/tokens"]))
    want = {k[4:]: data[k] for k in data.files if k.startswith("out/")}
    np.testing.assert_allclose(np.asarray(got["image_emb"]), want["image_emb"], atol=2e-5)
    np.testing.assert_allclose(np.asarray(got["text_emb"]), want["text_emb"], atol=2e-5)
    np.testing.assert_allclose(float(got["logit_scale"]), float(want["logit_scale"]), rtol=1e-6)
    # open_clip's logits cover positions 0..L-2 (it drops the last token before the decoder).
    np.testing.assert_allclose(np.asarray(got["caption_logits"])[:, :-1],
                               want["caption_logits"], atol=1e-4)
    extra = dict(sd, **{"text_decoder.resblocks.0.ls_1.gamma": np.ones(16, np.float32)})
    with pytest.raises(convert.ConvertError, match="ls_1"):
        convert.convert_coca_state_dict(extra, tiny_cfg())


def test_released_coca_architecture_converts():
    """open_clip's coca_ViT-B-32 shapes: the inferred config is the preset, and every weight
    lands on a parameter of its shape (checked without memory)."""
    shapes = json.loads((FIXTURE.parent / "released_shapes.json").read_text())["coca_ViT-B-32"]
    cfg = convert.infer_coca_config(shapes)
    ref = coca_config("coca_ViT-B-32")
    assert cfg["embed_dim"] == ref["embed_dim"]
    assert cfg["pooler"]["n_queries"] == ref["pooler"]["n_queries"]
    for key in ("width", "depth", "num_heads", "mlp_dim", "vocab_size", "context_length"):
        assert cfg["text"][key] == ref["text"][key], key
    abstract_sd = {k: jax.ShapeDtypeStruct(tuple(v), jnp.float32) for k, v in shapes.items()}
    params = nnx.state(abstract(cfg), nnx.Param)
    out = jax.eval_shape(lambda sd: convert.to_model_params(
        convert.convert_coca_state_dict(sd, cfg), params), abstract_sd)
    assert count_params(out) == sum(math.prod(v) for v in shapes.values()) == 253_560_065
