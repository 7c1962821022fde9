"""Training: sharded steps equal one-device steps; stop/resume continues from the checkpoint."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlm_jax import config as config_lib
from tests.runs import train_losses
from vlm_jax import parallel, train
from tests.model_fixtures import step_losses

TINY = "experiments/clip_tiny.py:test"


def _config(repo_root, *overrides):
    path, _, arg = TINY.partition(":")
    return config_lib.load_config(f"{repo_root / path}:{arg}", list(overrides))


def _batches(config, n, seed=0):
    rng = np.random.default_rng(seed)
    b, s = config.batch_size, config.model.image.image_size
    L, V = config.model.text.context_length, config.model.text.vocab_size
    out = []
    for _ in range(n):
        text = rng.integers(4, V, size=(b, L)).astype(np.int32)
        text[np.arange(b), rng.integers(3, L, size=b)] = config.model.text.eos_id
        out.append({"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "text": text})
    return out


SIGLIP = ("loss.name=sigmoid", "model.logit_bias_init=-10.0", "model.logit_scale_init=2.302585")

# (mesh, overrides of both runs, overrides of the mesh run only). The reference is one device,
# no remat, the all-gather loss: remat policies and loss algorithms must not change the numbers.
PARALLEL_CASES = {
    "dp2-fsdp2-tp2": ({"data": 2, "fsdp": 2, "tensor": 2}, (), ()),
    "fsdp8-remat-full": ({"fsdp": 8}, (), ("model.remat=full",)),
    "dp4-tp2-dots-scan": ({"data": 4, "tensor": 2}, ("model.scan_layers=true",),
                          ("model.remat=dots_saveable",)),
    "fsdp4-tp2-ring": ({"fsdp": 4, "tensor": 2}, (), ("loss.variant=ring",)),
    "dp2-fsdp4-chunked": ({"data": 2, "fsdp": 4}, (),
                          ("loss.variant=chunked", "loss.chunk_size=3")),
    "siglip-dp2-fsdp2-tp2-ring": ({"data": 2, "fsdp": 2, "tensor": 2}, SIGLIP,
                                  ("loss.variant=ring", "model.remat=full")),
}


@pytest.mark.parametrize("case", sorted(PARALLEL_CASES))
def test_parallel_train_steps_match_one_device(repo_root, case):
    mesh_shape, both, mesh_only = PARALLEL_CASES[case]
    base = ("model.text.num_heads=2", "model.image.num_heads=2", "model.text.depth=2", *both)
    if "loss.name=sigmoid" in both:
        base += ("loss.variant=gather",)
    config = _config(repo_root, *base)
    batches = _batches(config, 3)
    one = parallel.create_mesh({}, devices=jax.devices()[:1])
    ref, ref_state = step_losses(config, one, batches)
    got, state = step_losses(_config(repo_root, *base, *mesh_only), parallel.create_mesh(mesh_shape),
                         batches)
    assert np.all(np.diff(ref) != 0)  # The steps really update the model.
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # Parameters are sharded as the rules say (fsdp / tensor split the big kernels).
    shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
    if mesh_shape.get("fsdp", 1) > 1:
        assert any("fsdp" in sp for sp in shardings), shardings
    if mesh_shape.get("tensor", 1) > 1:
        assert any("tensor" in sp for sp in shardings), shardings
    for name in ("logit_scale", "logit_bias"):
        if name in ref_state["params"]:
            np.testing.assert_allclose(np.asarray(state["params"][name]),
                                       np.asarray(ref_state["params"][name]), atol=1e-5)


def test_sigmoid_loss_without_bias_is_a_config_error(repo_root):
    config = _config(repo_root, "loss.name=sigmoid", "loss.variant=ring")
    with pytest.raises(config_lib.ConfigError, match="logit_bias_init"):
        step_losses(config, parallel.create_mesh({"data": 8}), _batches(config, 1))


def test_unknown_loss_variant_is_a_config_error(repo_root):
    config = _config(repo_root, "loss.variant=allreduce")
    with pytest.raises(config_lib.ConfigError, match="config.loss.variant.*gather"):
        step_losses(config, parallel.create_mesh({"data": 8}), _batches(config, 1))


def _cli(repo_root, workdir, *extra, wait=True):
    cmd = [sys.executable, "-m", "vlm_jax.main", "train", "--config",
           str(repo_root / "experiments/clip_tiny.py") + ":test", "--workdir", str(workdir), *extra]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, env=env,
                              timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=repo_root, env=env)


_losses_by_step = train_losses


def test_eval_without_checkpoint_names_the_directory(repo_root, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "eval", "--config",
         str(repo_root / "experiments/clip_tiny.py") + ":test", "--workdir",
         str(tmp_path / "empty")], capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert proc.returncode == 2
    assert "No checkpoint found" in proc.stderr and str(tmp_path / "empty") in proc.stderr


def test_unwritable_workdir_is_a_config_error(repo_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = _config(repo_root)
    with pytest.raises(config_lib.ConfigError, match="not writable"):
        train.train_and_evaluate(config, str(blocker / "run"))
    assert blocker.read_text() == "not a directory"  # Nothing existing was touched.


def test_resume_with_changed_model_is_refused(repo_root, tmp_path):
    config = _config(repo_root)
    saved = config.to_dict()
    saved["model"]["image"]["width"] = 64  # The checkpoint was written by a wider model.
    now = json.loads(config_lib.to_json(config))
    with pytest.raises(config_lib.ConfigError, match=r"model.image.width: checkpoint 64 -> now 32"):
        train._check_resume_config(saved, now, tmp_path)
    train._check_resume_config(now, now, tmp_path)  # Unchanged config: accepted.


def test_resume_from_a_checkpoint_saved_before_base_keys_existed(repo_root, tmp_path):
    """A checkpoint whose saved config lacks keys added to the base config since (here
    optim.trainable, a resume-critical section, data.max_images and the whole guard section)
    resumes under the current config: a missing key counts at its default, as the run used it.
    The config goes through a real orbax save / restore (Checkpointer.saved_config)."""
    from vlm_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

    now = json.loads(config_lib.to_json(_config(repo_root)))
    old = json.loads(json.dumps(now))
    del old["optim"]["trainable"], old["data"]["max_images"], old["guard"]
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every_steps=1, async_save=False)
    ckpt.save(3, {"w": np.zeros(2, np.float32)}, config=old, force=True)
    saved = ckpt.saved_config(3)
    ckpt.close()
    assert "trainable" not in saved["optim"] and "guard" not in saved
    train._check_resume_config(saved, now, tmp_path)  # Accepted.
    # The old run trained every parameter (the default): freezing some now is a change.
    frozen = json.loads(config_lib.to_json(_config(repo_root, "optim.trainable=^image")))
    with pytest.raises(config_lib.ConfigError, match=r"optim.trainable: checkpoint '' -> now "
                                                     r"'\^image'"):
        train._check_resume_config(saved, frozen, tmp_path)


@pytest.mark.parametrize("key,saved_value,new_value", [
    ("train_files", "shards/a-{0..9}.tar", "shards/b-{0..9}.tar"),
    ("mixture", [{"name": "webdataset", "train_files": "a.tar", "weight": 1.0}],
     [{"name": "webdataset", "train_files": "a.tar", "weight": 0.5},
      {"name": "webdataset", "train_files": "b.tar", "weight": 0.5}]),
    ("tokenizer", "", "bpe_simple_vocab_16e6.txt.gz"),
])
def test_resume_with_changed_training_data_needs_the_override(repo_root, tmp_path, capsys, key,
                                                               saved_value, new_value):
    saved = json.loads(config_lib.to_json(_config(repo_root, f"data.{key}={saved_value!r}")))
    now = json.loads(config_lib.to_json(_config(repo_root, f"data.{key}={new_value!r}")))
    with pytest.raises(config_lib.ConfigError) as info:
        train._check_resume_config(saved, now, tmp_path)
    message = str(info.value)
    assert f"data.{key}: checkpoint {saved_value!r} -> now {new_value!r}" in message
    assert str(tmp_path) in message and "--config.checkpoint.allow_data_change=True" in message

    allowed = json.loads(config_lib.to_json(_config(
        repo_root, f"data.{key}={new_value!r}", "checkpoint.allow_data_change=True")))
    train._check_resume_config(saved, allowed, tmp_path)  # Accepted, with a note.
    assert f"Note: data.{key} changed" in capsys.readouterr().out

    # The override is for the data only: a changed model is still refused.
    allowed["model"]["image"]["width"] = 2 * allowed["model"]["image"]["width"]
    with pytest.raises(config_lib.ConfigError, match="model.image.width") as info:
        train._check_resume_config(saved, allowed, tmp_path)
    assert "allow_data_change" not in str(info.value)


def test_nonfinite_step_leaves_state_unchanged(repo_root, monkeypatch):
    """A NaN in the loss of step 2 (data=2 x fsdp=2 x tensor=2): params and optimizer state
    after it equal those after step 1 bit for bit, and step 3 then equals an unpoisoned run's
    step 2 on the same batch (the state really did not move)."""
    config = _config(repo_root)
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batches = _batches(config, 3)
    monkeypatch.setenv("VLM_JAX_FAULTS", "nan_loss@2")
    s = train.setup(config, mesh)
    step = train.make_train_step(s, {k: v.shape for k, v in batches[0].items()})
    state = s.init_fn()
    state, m1 = step(state, parallel.make_global_batch(batches[0], mesh))
    after_one = jax.device_get({k: state[k] for k in ("params", "opt_state")})
    state, m2 = step(state, parallel.make_global_batch(batches[1], mesh))
    assert np.isnan(float(m2["train/loss"])) and np.isnan(float(m2["train/grad_norm"]))
    after_two = jax.device_get({k: state[k] for k in ("params", "opt_state")})
    jax.tree.map(np.testing.assert_array_equal, after_two, after_one)
    assert int(state["step"]) == 2  # The data position still advances.
    state, m3 = step(state, parallel.make_global_batch(batches[2], mesh))
    monkeypatch.delenv("VLM_JAX_FAULTS")
    clean, _ = step_losses(config, mesh, [batches[0], batches[2]])
    assert float(m3["train/loss"]) == pytest.approx(clean[1], abs=1e-6)


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_coca_train_steps_match_one_device(repo_root, mesh_shape):
    """CoCa's loss (contrastive + captioning) and updates on 8 devices equal one device."""
    config = config_lib.load_config(
        str(repo_root / "experiments" / "coca_tiny_shapes.py") + ":test")
    batches = _batches(config, 2)
    for b in batches:  # Padding after eos, as the tokenizer writes (the caption loss skips it).
        after = np.cumsum(b["text"] == config.model.text.eos_id, axis=1) > 0
        b["text"] = np.where(after & (b["text"] != config.model.text.eos_id), 0, b["text"])
    ref, _ = step_losses(config, parallel.create_mesh({}, devices=jax.devices()[:1]), batches)
    got, state = step_losses(config, parallel.create_mesh(mesh_shape), batches)
    assert ref[0] != ref[1]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
