"""Micro-batched steps (optim.grad_accum_steps): the contrastive loss and its gradients over the
whole batch, every negative kept; a schedule that counts updates; the temperature clamped after
the update.

References: the same objective on the whole batch in one pass (k = 1), and optax's schedule.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import optim, parallel, train
from tests.model_fixtures import clip_pair_batch

TINY = "experiments/clip_tiny.py:test"


@pytest.fixture(autouse=True, scope="module")
def _compile_afresh():
    """This module's steps are compiled afresh, never loaded from the suite's persistent
    compilation cache: XLA's CPU client, serialising and loading the micro-batched sigmoid
    ring_recompute step on the data=2 x fsdp=2 x tensor=2 mesh, has been seen to return wrong
    gradients (docs/reliability.md, "Known issue"; tests/test_compilation_cache.py). JAX decides
    once per process whether to use the cache; ``reset_cache`` (no public equivalent) makes it
    decide again."""
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()
MESHES = {"data8": {"data": 8}, "dp2-fsdp2-tp2": {"data": 2, "fsdp": 2, "tensor": 2}}
SIGLIP = ("model.logit_bias_init=-10.0", "model.logit_scale_init=2.302585")
LOSSES = {  # name: overrides
    "softmax-gather": ("loss.variant=gather",),
    "softmax-ring": ("loss.variant=ring",),
    "softmax-chunked": ("loss.variant=chunked", "loss.chunk_size=5"),
    "sigmoid-ring": ("loss.name=sigmoid", "loss.variant=ring", *SIGLIP),
    "sigmoid-gather": ("loss.name=sigmoid", "loss.variant=gather", *SIGLIP),
    "softmax-ring_recompute": ("loss.variant=ring_recompute",),
    "sigmoid-ring_recompute": ("loss.name=sigmoid", "loss.variant=ring_recompute", *SIGLIP),
}


def _config(repo_root, *overrides, experiment=TINY):
    path, _, arg = experiment.partition(":")
    return config_lib.load_config(f"{repo_root / path}:{arg}",
                                  ["batch_size=32", *overrides])


def _loss_and_grads(config, mesh, batch):
    s = train.setup(config, mesh)
    params = s.init_fn()["params"]
    fn = jax.jit(train.make_loss_and_grads(s))
    loss, aux, grads = fn(params, parallel.make_global_batch(batch, mesh))
    return float(loss), jax.device_get(aux), jax.device_get(grads)


def _without_key_bias(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: ({n: v for n, v in sub.items() if n != "bias"} if k == "key" else
                _without_key_bias(sub)) for k, sub in tree.items()}


def _assert_grads_close(got, ref, atol):
    flat_ref = jax.tree_util.tree_leaves_with_path(ref)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    assert len(flat_ref) == len(flat_got)
    for path, r in flat_ref:
        np.testing.assert_allclose(flat_got[path], r, atol=atol, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


# The default suite runs two of the cases; `-m slow` (or `-k microbatch`) all of them.
FAST = {("softmax-gather", "dp2-fsdp2-tp2"), ("sigmoid-ring", "data8")}


@pytest.mark.parametrize("mesh_name,loss_name", [
    pytest.param(m, n, marks=() if (n, m) in FAST else pytest.mark.slow)
    for m in sorted(MESHES) for n in sorted(LOSSES)])
def test_microbatched_embeddings_equal_the_full_batch(repo_root, loss_name, mesh_name):
    """4 micro-batches in 'embeddings' mode: loss and every gradient equal one pass over the
    whole batch (float32), for each loss and variant, on two meshes."""
    mesh = parallel.create_mesh(MESHES[mesh_name])
    overrides = LOSSES[loss_name]
    config = _config(repo_root, *overrides)
    batch = clip_pair_batch(config)
    ref_loss, ref_aux, ref_grads = _loss_and_grads(config, mesh, batch)
    loss, aux, grads = _loss_and_grads(
        _config(repo_root, *overrides, "optim.grad_accum_steps=4"), mesh, batch)
    assert abs(loss - ref_loss) < 1e-5
    for key in ("train/i2t_acc", "train/t2i_acc", "train/logit_scale"):
        if key in ref_aux:
            np.testing.assert_allclose(aux[key], ref_aux[key], atol=1e-6)
    _assert_grads_close(grads, ref_grads, atol=1e-5)


def test_microbatched_coca_adds_its_captioning_term(repo_root):
    """CoCa: the contrastive loss over the whole batch plus the mean of the micro-batches'
    captioning losses equals the full-batch objective, and so do the gradients."""
    mesh = parallel.create_mesh({"data": 4, "fsdp": 2})
    exp = "experiments/coca_tiny_shapes.py:test"
    config = _config(repo_root, experiment=exp)
    batch = clip_pair_batch(config, seed=1)
    ref_loss, ref_aux, ref_grads = _loss_and_grads(config, mesh, batch)
    loss, aux, grads = _loss_and_grads(
        _config(repo_root, "optim.grad_accum_steps=2", experiment=exp), mesh, batch)
    assert abs(loss - ref_loss) < 1e-5
    np.testing.assert_allclose(aux["train/caption_loss"], ref_aux["train/caption_loss"],
                               atol=1e-5)
    _assert_grads_close(grads, ref_grads, atol=1e-5)


def test_plain_accumulation_changes_the_contrastive_objective(repo_root, caplog):
    """'gradients' mode is the mean of per-micro-batch losses: for CLIP each micro-batch sees
    only its own negatives, so the loss differs from the full batch's (the check above can
    fail), and the run is warned."""
    mesh = parallel.create_mesh({"data": 8})
    config = _config(repo_root)
    batch = clip_pair_batch(config)
    ref_loss, _, _ = _loss_and_grads(config, mesh, batch)
    with caplog.at_level(logging.WARNING, logger="vlm_jax.train"):
        loss, _, _ = _loss_and_grads(_config(repo_root, "optim.grad_accum_steps=4",
                                             "optim.grad_accum_mode=gradients"), mesh, batch)
    assert abs(loss - ref_loss) > 0.1  # log(32) vs log(8) negatives at initialisation
    assert "changes the contrastive objective" in caplog.text


def test_microbatched_lm_weights_micro_batches_by_their_tokens(repo_root):
    """The LM ('gradients' mode): micro-batches with different numbers of target tokens,
    combined weighted by their token counts, give the full batch's token-mean loss and
    gradients."""
    mesh = parallel.create_mesh({"data": 4, "fsdp": 2})
    exp = "experiments/lm_tiny_shapes.py:test"
    config = _config(repo_root, experiment=exp)
    rng = np.random.default_rng(0)
    b, t = config.batch_size, 24
    config = _config(repo_root, f"data.seq_length={t}", experiment=exp)
    tokens = rng.integers(4, config.model.vocab_size, size=(b, t)).astype(np.int32)
    weights = (np.arange(t)[None] < rng.integers(2, t, size=(b, 1))).astype(np.float32)
    batch = {"tokens": tokens, "weights": weights}
    ref_loss, ref_aux, ref_grads = _loss_and_grads(config, mesh, batch)
    loss, aux, grads = _loss_and_grads(
        _config(repo_root, f"data.seq_length={t}", "optim.grad_accum_steps=2", experiment=exp),
        mesh, batch)
    assert aux["train/target_tokens"] == ref_aux["train/target_tokens"]
    assert abs(loss - ref_loss) < 1e-5
    _assert_grads_close(grads, ref_grads, atol=1e-5)


def test_microbatches_must_divide_the_shard_rows(repo_root):
    mesh = parallel.create_mesh({"data": 8})
    config = _config(repo_root, "optim.grad_accum_steps=3")  # 4 rows per shard
    with pytest.raises(config_lib.ConfigError,
                       match="config.optim.grad_accum_steps=3 does not divide the 4 rows"):
        _loss_and_grads(config, mesh, clip_pair_batch(config))


@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_accum_schedule_counts_updates(repo_root, k):
    """k micro-batches per step: the same updates as k = 1 (a reference without accumulation),
    the logged train/lr is optax's schedule at the update count, warm-up ends where the config
    says."""
    mesh = parallel.create_mesh({"data": 4, "fsdp": 2})
    common = ("total_steps=6", "optim.warmup_steps=2", "optim.grad_clip_norm=0.0")
    runs = {}
    for n in (1, k):
        config = _config(repo_root, *common, f"optim.grad_accum_steps={n}")
        s = train.setup(config, mesh)
        step = train.make_train_step(s)
        state = s.init_fn()
        lrs, losses = [], []
        for i in range(6):
            state, m = step(state, parallel.make_global_batch(clip_pair_batch(config, seed=i), mesh))
            lrs.append(float(m["train/lr"]))
            losses.append(float(m["train/loss"]))
        runs[n] = (np.array(lrs), np.array(losses), jax.device_get(state["params"]))
    ref_schedule = optim.make_schedule(config.optim, config.total_steps)
    expected = np.array([float(ref_schedule(i)) for i in range(6)])
    np.testing.assert_allclose(runs[k][0], expected, rtol=1e-6)
    assert runs[k][0][2] == pytest.approx(config.optim.lr)  # the end of warm-up, at update 2
    np.testing.assert_allclose(runs[k][1], runs[1][1], atol=1e-5)
    # Parameters after 6 Adam updates agree to a tenth of one update (lr 1e-3): Adam divides by
    # the root of the squared gradient, so where a gradient is nearly zero (a rarely seen
    # token's embedding) float32 round-off moves the update by more than round-off. The
    # attention key biases have a zero gradient in exact arithmetic (softmax is invariant to
    # them): their updates are round-off of either sign, and are left out.
    _assert_grads_close(_without_key_bias(runs[k][2]), _without_key_bias(runs[1][2]),
                        atol=1e-4)


def test_temperature_is_clamped_after_the_update_not_in_the_forward(repo_root):
    """open_clip's semantics: the forward pass uses exp(logit_scale) as it is (its gradient at
    the bound is the unclipped one), and the parameter is clamped to [0, logit_scale_max] after
    the optimizer step."""
    mesh = parallel.create_mesh({"data": 8})
    top = float(np.log(100.0))
    config = _config(repo_root, f"model.logit_scale_init={top}", "optim.lr=0.5",
                     "optim.warmup_steps=0", "optim.weight_decay=0.0")
    s = train.setup(config, mesh)
    state = s.init_fn()
    batch = parallel.make_global_batch(clip_pair_batch(config), mesh)
    _, _, grads = jax.jit(train.make_loss_and_grads(s))(state["params"], batch)
    g_top = float(grads["logit_scale"])
    # The same gradient just under the bound (continuity): no clip cuts it at the bound.
    below = dict(state["params"], logit_scale=jnp.asarray(top - 1e-4, jnp.float32))
    _, _, grads_below = jax.jit(train.make_loss_and_grads(s))(below, batch)
    assert g_top != 0.0
    assert g_top == pytest.approx(float(grads_below["logit_scale"]), rel=1e-2)
    state, _ = train.make_train_step(s)(state, batch)
    value = float(state["params"]["logit_scale"])
    if g_top < 0:  # Adam's first step moves by ~lr against the gradient's sign.
        assert value == np.float32(top)  # pushed up, clamped back to the bound
    else:
        assert top - 0.6 < value < top - 0.4  # pushed down: below the bound by ~lr
