"""SigLIP 2's self-supervised terms (vlm_jax/distill.py, the CLIP family's switches):

1. each loss against a numpy reference written independently (masked patches gathered, not
   masked out; Sinkhorn-Knopp as DINOv2 writes it), and the EMA update against numpy;
2. each loss, the on-device views and the patch mask under jit with the batch sharded over 8
   devices (data=8; data=2 x fsdp=2 x tensor=2) equal the one-device value within 1e-5;
3. the schedule: no term before ``ssl_start_fraction x total_steps``, the weighted terms from
   it on; the teacher a copy of the student before the start, an EMA after it;
4. train steps with the terms on, sharded, equal one device; ``vlm-jax train`` runs the
   experiment end to end.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from tests.runs import train_losses
from vlm_jax import config as config_lib
from vlm_jax import distill, train
from vlm_jax.families import clip as clip_family
from vlm_jax.parallel import batch_spec, create_mesh
from tests.model_fixtures import clip_pair_batch, step_losses

EXPERIMENT = "experiments/siglip2_tiny_shapes.py"
MESHES = {"data8": {"data": 8}, "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}


# --- numpy references ---------------------------------------------------------------------------

def np_sinkhorn(logits, temp, iters=3):
    """DINOv2's ``sinkhorn_knopp_teacher`` on ``[N, K]`` logits (Q is K x N there)."""
    q = np.exp((logits - logits.max()) / temp).T.astype(np.float64)
    k, n = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_self_distill(student, teacher, ts=0.1, tt=0.04):
    t = np_sinkhorn(teacher, tt)
    return np.mean([-(t * np_log_softmax(s / ts)).sum(-1) for s in student])


def np_masked(student, teacher, mask, ts=0.1, tt=0.04):
    s, t = student[mask], teacher[mask]  # [masked patches of the batch, K]
    return np.mean(-(np_sinkhorn(t, tt) * np_log_softmax(s / ts)).sum(-1))


def _logits(rng, *shape):
    return np.tanh(rng.normal(size=shape)).astype(np.float32)  # cosines, as the heads give


# --- 1. numpy -----------------------------------------------------------------------------------

@pytest.mark.parametrize("v,b,k", [(1, 4, 8), (3, 16, 32)])
def test_self_distillation_matches_numpy(v, b, k):
    rng = np.random.default_rng(v)
    s, t = _logits(rng, v, b, k), _logits(rng, b, k)
    got = distill.self_distillation_loss(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(float(got), np_self_distill(s, t), rtol=1e-5)
    q = np.asarray(distill.sinkhorn_knopp(jnp.asarray(t), 0.04))
    np.testing.assert_allclose(q, np_sinkhorn(t, 0.04), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)  # each sample a distribution


def test_masked_prediction_matches_numpy():
    rng = np.random.default_rng(0)
    b, n, k = 4, 9, 16
    s, t = _logits(rng, b, n, k), _logits(rng, b, n, k)
    mask = np.asarray(distill.random_patch_mask(jax.random.key(1), b, n, 0.5))
    assert (mask.sum(1) == 4).all()  # round(0.5 x 9) per image
    got = distill.masked_prediction_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), np_masked(s, t, mask), rtol=1e-5)
    # The unmasked patches do not enter: changing them changes nothing.
    s2, t2 = s.copy(), t.copy()
    s2[~mask], t2[~mask] = 5.0, -5.0
    np.testing.assert_allclose(float(distill.masked_prediction_loss(s2, t2, mask)), float(got),
                               rtol=1e-6)


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(0)
    teacher = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": np.float32(2.0)}}
    student = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": np.float32(-1.0)}}
    got = distill.ema_update(teacher, student, 0.9)
    np.testing.assert_allclose(got["a"], 0.9 * teacher["a"] + 0.1 * student["a"], rtol=1e-6)
    np.testing.assert_allclose(got["b"]["c"], 0.9 * 2.0 + 0.1 * -1.0, rtol=1e-6)


def test_random_crops():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
    # The whole image at its own size is the image.
    whole = distill.random_crops(jnp.asarray(img), jax.random.key(0), 16, (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(whole), img)
    # A quarter-area square crop at half the size: a 2x2 box average of an 8x8 window.
    flat = np.repeat(np.repeat(rng.integers(0, 256, size=(2, 8, 8, 3)), 2, 1), 2, 2)
    got = distill.random_crops(jnp.asarray(flat.astype(np.float32)), jax.random.key(3), 4,
                               (0.25, 0.25), (1.0, 1.0))
    assert got.shape == (2, 4, 4, 3) and got.dtype == jnp.float32
    assert float(got.min()) >= 0 and float(got.max()) <= 255


# --- 2. sharded == one device --------------------------------------------------------------------

def _put(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, batch_spec(np.ndim(x))))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_losses_and_views_sharded_match_one_device(mesh_name):
    mesh = create_mesh(MESHES[mesh_name])
    one = create_mesh({}, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    b, v, n, k = 16, 3, 9, 32
    sd_s, sd_t = _logits(rng, b, v, k), _logits(rng, b, k)  # student batch-major, as sharded
    mp_s, mp_t = _logits(rng, b, n, k), _logits(rng, b, n, k)
    images = rng.integers(0, 256, size=(b, 16, 16, 3)).astype(np.uint8)

    @jax.jit
    def terms(sd_s, sd_t, mp_s, mp_t, images):
        mask = distill.random_patch_mask(jax.random.key(2), b, n, 0.5)
        crops = distill.random_crops(images, jax.random.key(3), 8, (0.05, 0.4))
        return (distill.self_distillation_loss(jnp.swapaxes(sd_s, 0, 1), sd_t),
                distill.masked_prediction_loss(mp_s, mp_t, mask), mask, crops)

    args = (sd_s, sd_t, mp_s, mp_t, images)
    want = terms(*[_put(one, a) for a in args])
    got = terms(*[_put(mesh, a) for a in args])
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(got[1]), float(want[1]), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))
    np.testing.assert_allclose(float(want[0]), np_self_distill(np.swapaxes(sd_s, 0, 1), sd_t),
                               rtol=1e-5)


# --- 3. the schedule and the teacher ------------------------------------------------------------

def _config(repo_root, *overrides):
    return config_lib.load_config(f"{repo_root / EXPERIMENT}:test", list(overrides))


def test_schedule_switch_and_teacher_update(repo_root):
    config = _config(repo_root)
    start = clip_family.ssl_start_step(config)
    assert start == round(0.8 * config.total_steps) == 5
    model = clip_family.build_model(config.model, nnx.Rngs(0))
    params = nnx.state(model).to_pure_dict()
    # A teacher that differs from the student, so that the terms are not trivially small.
    teacher = jax.tree.map(lambda x: x * 0.9, clip_family.teacher_params(params, config))
    batch = jax.tree.map(jnp.asarray, clip_pair_batch(config))
    mesh = create_mesh({}, devices=jax.devices()[:1])

    def run(step):
        return clip_family.objective(model, batch, config, mesh,
                                     ctx={"step": jnp.int32(step), "teacher": teacher})

    plain, _ = clip_family.objective(model, batch, config, mesh)
    before, m0 = run(start - 1)
    after, m1 = run(start)
    assert float(before) == float(plain)
    assert float(m0["train/self_distill_loss"]) == float(m0["train/masked_pred_loss"]) == 0.0
    sd, mp = float(m1["train/self_distill_loss"]), float(m1["train/masked_pred_loss"])
    assert sd > 0 and mp > 0
    np.testing.assert_allclose(float(after), float(plain) + 1.0 * sd + 0.25 * mp, rtol=1e-6)

    # Teacher: a copy of the student up to the start, then m x teacher + (1 - m) x student.
    student = clip_family.teacher_params(params, config)
    m = config.loss.ema_momentum
    copied = clip_family.update_teacher(teacher, params, jnp.int32(start - 1), config)
    emad = clip_family.update_teacher(teacher, params, jnp.int32(start), config)
    for c, e, t, s in zip(jax.tree.leaves(copied), jax.tree.leaves(emad),
                          jax.tree.leaves(teacher), jax.tree.leaves(student)):
        np.testing.assert_array_equal(np.asarray(c), np.asarray(s))
        np.testing.assert_allclose(np.asarray(e), m * np.asarray(t) + (1 - m) * np.asarray(s),
                                   rtol=1e-5, atol=1e-7)


def test_terms_need_the_heads(repo_root):
    config = _config(repo_root, "model.ssl_prototypes=0")
    with pytest.raises(config_lib.ConfigError, match="ssl_prototypes"):
        train.setup(config)


# --- 4. train steps and the CLI -----------------------------------------------------------------


@pytest.mark.slow  # ~80 s of CPU (four step compilations); the losses' sharding is checked above
def test_train_steps_sharded_match_one_device(repo_root):
    # Terms on from the second of three steps (round(0.2 x 6) = 1).
    config = _config(repo_root, "loss.ssl_start_fraction=0.2", "model.image.num_heads=2")
    batches = [clip_pair_batch(config, i) for i in range(3)]
    ref, ref_state = step_losses(config, create_mesh({}, devices=jax.devices()[:1]), batches)
    got, state = step_losses(config, create_mesh(MESHES["data2_fsdp2_tensor2"]), batches)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    for a, b in zip(jax.tree.leaves(state["teacher"]), jax.tree.leaves(ref_state["teacher"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    # The teacher moved off the student after the start (EMA), and is in the train state.
    s_img = jax.tree.leaves(ref_state["params"]["image"])
    t_img = jax.tree.leaves(ref_state["teacher"]["image"])
    assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(s_img, t_img))


@pytest.mark.e2e
def test_siglip2_experiment_trains_with_the_cli(repo_root, shapes_data_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlm_jax.main", "train", "--config",
           f"{repo_root / EXPERIMENT}:test", "--workdir", str(workdir),
           f"--config.data.data_dir={shapes_data_dir}", "--config.log_every_steps=1",
           "--config.evals.zeroshot.max_examples=16", "--config.evals.retrieval.max_examples=16"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from vlm_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
    records = {r["step"]: r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for step, r in records.items():  # steps 1-5 are indices 0-4: before 80 % of 6 steps
        on = step == 6
        assert (r["train/self_distill_loss"] > 0) == on and (r["train/masked_pred_loss"] > 0) == on
        expected = r["train/contrastive_loss"] + r["train/self_distill_loss"] + \
            0.25 * r["train/masked_pred_loss"]
        assert abs(r["train/loss"] - expected) < 1e-4 * max(1.0, abs(expected))
    assert set(train_losses(workdir)) == set(records)
