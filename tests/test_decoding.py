"""The one decoding module (vlm_jax.decoding) on each of its three models: CoCa (a bos start and
an image context), the language model and Flamingo (left-padded prompts of different lengths).

References: greedy decoding for beam 1 and top-k 1 sampling; the full forward recomputed at
every step (``use_cache=False``) for the KV-cached loops; for the LM an argmax loop over full
forwards of each unpadded prompt, written here without vlm_jax.decoding; jit's own cache for the
number of compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vlm_jax  # noqa: F401  (disables eager sharding)
from tests.model_fixtures import randomize
from vlm_jax import decoding
from vlm_jax.families import get_family
from vlm_jax.models.flamingo import Flamingo
from vlm_jax.models.lm import LanguageModel

V, PAD, BOS = 40, 0, 1
IMG, EOC = V, V + 1  # Flamingo's <image>, <|endofchunk|>
NEW = 6  # new tokens of the LM / Flamingo decodes
B = 3



def left_pad(rows):
    width = max(map(len, rows))
    tokens = np.full((len(rows), width), PAD, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], valid[i, width - len(r):] = r, True
    return tokens, valid


LM_PROMPTS = [[BOS, 5, 6, 7, 8], [BOS, 9], [BOS, 11, 12]]
FLAMINGO_PROMPTS = [[BOS, IMG, 5, 6, EOC, IMG], [BOS, 11, IMG], [BOS, IMG, 7]]


def make_lm(eos_id):
    return randomize(nnx.eval_shape(lambda: LanguageModel(
        style="llama", vocab_size=V, width=16, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=32,
        max_length=24, bos_id=BOS, eos_id=eos_id, rngs=nnx.Rngs(0))), seed=3, scale=0.3)


def make_case(name):
    """``(model, images or None, prompt or None, prompt_valid or None, options)``. The stop
    tokens are chosen so that, with these seeds, some rows stop early and others run on."""
    if name == "coca":
        cfg = dict(
            name="coca", embed_dim=16,
            image=dict(width=24, depth=2, num_heads=2, mlp_dim=96, patch_size=8, image_size=16),
            text=dict(width=16, depth=2, num_heads=2, mlp_dim=64, vocab_size=V,
                      context_length=8, bos_id=BOS, eos_id=30, pad_id=PAD),
            decoder=dict(depth=2, num_heads=4, mlp_dim=64), pooler=dict(n_queries=5, num_heads=2))
        model = randomize(nnx.eval_shape(lambda: get_family(cfg).build_model(cfg, nnx.Rngs(0))),
                          seed=0, scale=0.3)
        images = jnp.asarray(np.random.RandomState(1).randn(B, 16, 16, 3), jnp.float32)
        return model, images, None, None, {}
    if name == "lm":
        tokens, valid = left_pad(LM_PROMPTS)
        return make_lm(eos_id=2), None, tokens, valid, {"max_new_tokens": NEW}
    model = randomize(nnx.eval_shape(lambda: Flamingo(
        vision=dict(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=64),
        lm=dict(style="llama", vocab_size=V, width=32, depth=2, num_heads=4, num_kv_heads=2,
                mlp_dim=64, max_length=32, bos_id=BOS, eos_id=6),
        resampler=dict(depth=1, num_latents=4, num_heads=2), cross_attn=dict(num_heads=2),
        cross_attn_every=1, rngs=nnx.Rngs(0))), seed=1, scale=0.2)
    images = jax.random.normal(jax.random.key(0), (B, 2, 32, 32, 3))
    tokens, valid = left_pad(FLAMINGO_PROMPTS)
    return model, images, tokens, valid, {"max_new_tokens": NEW}


@functools.lru_cache(maxsize=None)
def decoded(name):
    """Every decode of one model in one compiled program (XLA:CPU compiles cost seconds each),
    through the public entry point traced inside the caller's jit."""
    model, images, prompt, valid, opts = make_case(name)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(params):
        def gen(method, **kw):
            return decoding.generate(graphdef, images, prompt=prompt, prompt_valid=valid,
                                     params=params, method=method, jit=False, **opts, **kw)

        return dict(
            greedy=gen("greedy"), greedy_nocache=gen("greedy", use_cache=False),
            beam1=gen("beam", beam_size=1, length_penalty=0.7),
            beam3=gen("beam", beam_size=3, early_stopping=False),
            beam3_nocache=gen("beam", beam_size=3, early_stopping=False, use_cache=False),
            topk1=gen("sample", top_k=1, temperature=0.8, rng=jax.random.key(5)))

    return model, prompt, jax.tree.map(np.asarray, run(state.to_pure_dict()))


NAMES = ["coca", "lm", "flamingo"]


def _check_format(model, prompt, tokens):
    """The prompt first, then new tokens, pad after each row's first stop token."""
    p = 1 if prompt is None else prompt.shape[1]
    if prompt is not None:
        np.testing.assert_array_equal(tokens[:, :p], prompt)
    ends = []
    for row in tokens:
        new = row[p:]
        stops = np.flatnonzero(np.isin(new, model.stop_ids))
        end = stops[0] + 1 if stops.size else len(new)
        assert (new[end:] == PAD).all(), row
        ends.append(end)
    return ends


@pytest.mark.parametrize("name", NAMES)
def test_greedy_format_and_rows_stop_apart(name):
    model, prompt, out = decoded(name)
    ends = _check_format(model, prompt, out["greedy"])
    new = out["greedy"].shape[1] - (1 if prompt is None else prompt.shape[1])
    assert min(ends) < new and len(set(ends)) > 1, out["greedy"]  # the stop logic has teeth


@pytest.mark.parametrize("name", NAMES)
def test_cached_equals_uncached(name):
    _, _, out = decoded(name)
    np.testing.assert_array_equal(out["greedy_nocache"], out["greedy"])
    np.testing.assert_array_equal(out["beam3_nocache"], out["beam3"])


@pytest.mark.parametrize("name", NAMES)
def test_beam_1_equals_greedy(name):
    model, prompt, out = decoded(name)
    np.testing.assert_array_equal(out["beam1"], out["greedy"])
    _check_format(model, prompt, out["beam3"])


@pytest.mark.parametrize("name", NAMES)
def test_top_k_1_sampling_equals_greedy(name):
    _, _, out = decoded(name)
    np.testing.assert_array_equal(out["topk1"], out["greedy"])


def test_lm_greedy_equals_argmax_loop_over_full_forwards():
    """Left-padded prompts of different lengths, KV cache, early stop: the same tokens as
    feeding each unpadded prompt alone through the full forward and taking the argmax."""
    model, prompt, out = decoded("lm")
    got = out["greedy"][:, prompt.shape[1]:]
    width = max(map(len, LM_PROMPTS)) + NEW
    forward = nnx.jit(lambda m, x: m(x))  # one shape: [1, width]

    for i, p in enumerate(LM_PROMPTS):
        seq = list(p)
        for _ in range(NEW):
            # The sequence right-padded to a fixed width: causal, so the logits at its last
            # token do not see the padding after it.
            row = jnp.asarray([seq + [PAD] * (width - len(seq))], jnp.int32)
            logits = np.asarray(forward(model, row))
            seq.append(int(np.argmax(logits[0, len(seq) - 1])))
            if seq[-1] == model.eos_id:
                break
        want = seq[len(p):]
        assert got[i, :len(want)].tolist() == want, (i, got[i], want)
        assert (got[i, len(want):] == PAD).all()


def test_compiled_once_per_shape():
    """Traced options (temperature, top_p, min_length) do not recompile; a new prompt shape
    does, once."""
    model, _, prompt, valid, _ = make_case("lm")
    fn = decoding._generate_jit  # pylint: disable=protected-access
    before = fn._cache_size()  # pylint: disable=protected-access

    def run(tokens, mask, **kw):
        return np.asarray(decoding.generate(model, prompt=tokens, prompt_valid=mask,
                                            method="sample", rng=jax.random.key(0),
                                            max_new_tokens=NEW, **kw))

    a = run(prompt, valid, temperature=0.7, top_p=0.9, min_length=0)
    b = run(prompt, valid, temperature=50.0, top_p=0.99, min_length=prompt.shape[1] + 2)
    assert fn._cache_size() == before + 1  # pylint: disable=protected-access
    assert (a != b).any()  # the new values took effect
    np.testing.assert_array_equal(a[:, :prompt.shape[1]], prompt)
    assert not np.isin(b[:, prompt.shape[1]:prompt.shape[1] + 2], model.stop_ids).any()
    wider, wider_valid = left_pad(LM_PROMPTS + [[BOS, 4, 4, 4, 4, 4, 4]])
    run(wider, wider_valid, temperature=0.7, top_p=0.9, min_length=0)
    run(wider, wider_valid, temperature=1.0, top_p=0.5, min_length=0)
    assert fn._cache_size() == before + 2  # pylint: disable=protected-access


def test_bad_inputs_name_the_fix():
    lm = make_lm(eos_id=2)
    tokens, valid = left_pad(LM_PROMPTS)
    with pytest.raises(ValueError, match="left-padded"):
        decoding.generate(lm, prompt=tokens, prompt_valid=valid[:, ::-1].copy())
    with pytest.raises(ValueError, match="not conditioned on images"):
        decoding.generate(lm, jnp.zeros((B, 8, 8, 3)), prompt=tokens, jit=False)
    with pytest.raises(ValueError, match="context_length=24"):
        decoding.generate(lm, prompt=tokens, max_new_tokens=40, jit=False)
    with pytest.raises(ValueError, match="not both"):
        decoding.generate(lm, prompt=tokens, max_new_tokens=4, max_length=9, jit=False)
    coca, images, *_ = make_case("coca")
    with pytest.raises(ValueError, match="decodes from images"):
        decoding.generate(coca, jit=False)
    with pytest.raises(ValueError, match="pass no prompt_valid"):
        decoding.generate(coca, images, prompt=np.full((B, 2), BOS), jit=False,
                          prompt_valid=np.ones((B, 2), bool))
