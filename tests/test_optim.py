"""Optimizer: open_clip's weight-decay exclusion rule and the warm-up + cosine schedule."""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlm_jax import configs, optim


def _cfg(**kw):
    base = dict(configs.base_config().optim.to_dict(), name="adamw", lr=1e-3, b1=0.9, b2=0.98,
                eps=1e-6, weight_decay=0.2, warmup_steps=10, schedule="cosine",
                end_lr_factor=0.0, grad_clip_norm=1.0, grad_accum_steps=1)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_decay_mask_matches_open_clip_rule():
    params = {
        "logit_scale": jnp.zeros(()),
        "image": {"cls_token": jnp.zeros((1, 1, 8)), "pos_embed": jnp.zeros((5, 8)),
                  "ln_pre": {"scale": jnp.zeros(8), "bias": jnp.zeros(8)},
                  "block": {"fc1": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)}}},
        "text": {"token_embed": {"embedding": jnp.zeros((100, 8))}},
    }
    mask = optim.decay_mask(params)
    # open_clip: exclude p.ndim < 2 or 'bias'/'ln'/'logit_scale' in name; the class token too.
    assert mask["logit_scale"] is False
    assert mask["image"]["cls_token"] is False
    assert mask["image"]["ln_pre"]["scale"] is False and mask["image"]["ln_pre"]["bias"] is False
    assert mask["image"]["block"]["fc1"]["bias"] is False
    assert mask["image"]["block"]["fc1"]["kernel"] is True
    assert mask["image"]["pos_embed"] is True
    assert mask["text"]["token_embed"]["embedding"] is True


def test_schedule_matches_formula():
    sched = optim.make_schedule(_cfg(), total_steps=110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5e-3)
    assert float(sched(10)) == pytest.approx(1e-3)
    # Cosine from step 10 to 110: half way is lr / 2.
    assert float(sched(60)) == pytest.approx(0.5e-3, rel=1e-5)
    t = (85 - 10) / 100
    assert float(sched(85)) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * t)), rel=1e-5)


def test_adamw_update_matches_manual():
    """One AdamW step equals the textbook update (decay only on the masked parameter)."""
    tx, sched = optim.make_optimizer(_cfg(grad_clip_norm=0.0, warmup_steps=1), total_steps=100)
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    grads = {"w": jnp.full((2, 2), 0.5), "bias": jnp.full(2, 0.5)}
    state = tx.init(params)
    for _ in range(2):  # Step 0 has lr 0 (warm-up); check step 1.
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
    lr = float(sched(1))
    b1, b2, eps = 0.9, 0.98, 1e-6
    m = (1 - b1 ** 2) * 0.5 / (1 - b1 ** 2)
    v = (1 - b2 ** 2) * 0.25 / (1 - b2 ** 2)
    adam = m / (math.sqrt(v) + eps)
    np.testing.assert_allclose(new["w"], 1 - lr * (adam + 0.2 * 1.0), rtol=1e-6)
    np.testing.assert_allclose(new["bias"], 1 - lr * adam, rtol=1e-6)


def test_warmup_longer_than_run_is_rejected():
    from vlm_jax.config import ConfigError
    with pytest.raises(ConfigError, match="warmup_steps"):
        optim.make_schedule(_cfg(warmup_steps=100), total_steps=50)
