"""Model families: the batch spec is the one source of the training batch.

The program `vlm-jax compile` lowers (aot.lower_train_step, from the family's batch spec) must
accept, unchanged, the batch `vlm-jax train` passes (from the family's data pipeline): a jax
executable compiled for other shapes or dtypes refuses its arguments.
"""
import numpy as np
import pytest

from vlm_jax import aot, parallel, train
from vlm_jax import config as config_lib
from vlm_jax.data import DataError
from vlm_jax.families import CAPABILITIES, FAMILIES, get_family

CASES = {  # name: (experiment, overrides)
    "clip_shapes": ("clip_tiny.py:test", ()),
    "lm_documents": ("lm_tiny_shapes.py:test", ()),
    "flamingo_documents": ("flamingo_tiny_shapes.py:test", ()),
    "clip_webdataset": ("clip_tiny.py:test", ("data.name=webdataset",)),
}


def _config(repo_root, case, data_dir, tmp_path):
    experiment, overrides = CASES[case]
    path, _, arg = experiment.partition(":")
    overrides = [f"data.data_dir={data_dir}", *overrides]
    if case.endswith("webdataset"):  # The shapes train split exported as tar shards.
        from input_pipeline import tools  # pylint: disable=import-outside-toplevel

        tools.export_webdataset(data_dir, "shapes", "32px", "train", str(tmp_path), 200)
        overrides.append(f"data.train_files={tmp_path}/train-*.tar")
    return config_lib.load_config(f"{repo_root / 'experiments' / path}:{arg}", overrides)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_step_takes_the_batch_train_passes(case, repo_root, shapes_data_dir, tmp_path):
    config = _config(repo_root, case, shapes_data_dir, tmp_path)
    family = get_family(config)
    spec = family.batch_spec(config)
    # What the train loop passes: the pipeline's batch, restricted to the spec's keys (one
    # process here, so the local batch is the global one).
    local = next(family.make_data(config).train_iterator())
    batch = {k: local[k] for k in spec}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == \
        {k: (s.shape, np.dtype(s.dtype)) for k, s in spec.items()}
    train.check_batch(local, spec, 1)
    if "image" in spec or "images" in spec:  # Every pipeline ships uint8 pixels.
        assert batch.get("image", batch.get("images")).dtype == np.uint8

    mesh = parallel.create_mesh({"data": 4, "fsdp": 2})  # 8 CPU devices
    s = train.setup(config, mesh)
    lowered = aot.lower_train_step(s)  # What `vlm-jax compile` compiles.
    args = lowered.args_info[0][1]
    assert {k: (a.shape, np.dtype(a.dtype)) for k, a in args.items()} == \
        {k: (v.shape, v.dtype) for k, v in batch.items()}
    compiled = lowered.compile()
    # The executable refuses arguments of other shapes or dtypes: it runs on train's batch.
    state, metrics = compiled(s.init_fn(), parallel.make_global_batch(batch, mesh))
    assert np.isfinite(float(metrics["train/loss"])) and int(state["step"]) == 1


def test_check_batch_names_key_shape_and_dtype(repo_root):
    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}:test")
    spec = get_family(config).batch_spec(config)
    good = {k: np.zeros((v.shape[0] // 2, *v.shape[1:]), v.dtype) for k, v in spec.items()}
    train.check_batch(good, spec, 2)
    with pytest.raises(DataError, match=r"'image' as float32 \[8, 32, 32, 3\].*uint8 "
                                        r"\[8, 32, 32, 3\]"):
        train.check_batch(dict(good, image=good["image"].astype(np.float32)), spec, 2)
    with pytest.raises(DataError, match="no 'text'"):
        train.check_batch({"image": good["image"]}, spec, 2)


def test_get_family_and_declared_capabilities(repo_root):
    assert sorted(FAMILIES) == ["clip", "coca", "flamingo", "lit", "lm", "locca"]
    for name, experiment in (("clip", "siglip_tiny.py"), ("coca", "coca_tiny_shapes.py"),
                             ("lit", "lit_tiny_shapes.py"), ("locca", "locca_tiny_shapes.py"),
                             ("lm", "lm_tiny_shapes.py"), ("flamingo", "flamingo_tiny_shapes.py")):
        config = config_lib.load_config(str(repo_root / "experiments" / experiment))
        family = get_family(config)
        assert family is get_family(config.model) is get_family(name) and family.name == name
        assert family.capabilities <= set(CAPABILITIES)
        for entry in family.default_evals(config).values():
            assert set(entry) == {"type", "dataset", "split", "every_steps", "max_examples",
                                  "options"}
    assert "caption" in FAMILIES["coca"].capabilities
    assert "caption" not in FAMILIES["clip"].capabilities
    assert FAMILIES["lm"].image_size(None) is None
    with pytest.raises(config_lib.ConfigError, match=r"'vit' is not a model family.*'clip'"):
        get_family({"name": "vit"})


def test_caption_needs_the_caption_capability(repo_root, tmp_path):
    """`vlm-jax caption` asks the family, before reading any image or checkpoint."""
    from vlm_jax import caption  # pylint: disable=import-outside-toplevel

    for experiment in ("clip_tiny.py:test", "flamingo_tiny_shapes.py:test"):
        path, _, arg = experiment.partition(":")
        config = config_lib.load_config(f"{repo_root / 'experiments' / path}:{arg}")
        name = get_family(config).name
        with pytest.raises(config_lib.ConfigError,
                           match=rf"'{name}' model, which has no captioning decoder.*\['coca', 'locca'\]"):
            caption.caption_folder(config, str(tmp_path), str(tmp_path / "no_such_folder"))


def test_a_new_family_is_one_object(repo_root, shapes_data_dir, tmp_path, monkeypatch):
    """docs/design.md's worked example: a LiT-style family (CLIP with its image tower locked)
    registered as one Family trains, checkpoints and is evaluated by the unchanged loop, and
    only the parameters its objective and optim.trainable let through move."""
    import dataclasses  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel

    from vlm_jax import families  # pylint: disable=import-outside-toplevel
    from vlm_jax import losses  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import clip  # pylint: disable=import-outside-toplevel

    def objective(model, batch, config, mesh):
        out = model(batch["image"], batch["text"])
        loss, metrics = losses.contrastive_loss(
            jax.lax.stop_gradient(out["image_emb"]), out["text_emb"], out["logit_scale"],
            mesh=mesh, variant=config.loss.variant)
        return loss, {f"train/{k}": v for k, v in metrics.items()}

    lit = dataclasses.replace(clip.FAMILY, name="lit", objective=objective)
    monkeypatch.setitem(families.FAMILIES, "lit", lit)
    config = config_lib.load_config(
        f"{repo_root / 'experiments' / 'clip_tiny.py'}:test",
        [f"data.data_dir={shapes_data_dir}", "model.name=lit", "total_steps=3",
         r"optim.trainable=^(text|text_projection|logit_scale)(\.|$)",
         "evals.linear_probe.every_steps=0"])
    assert get_family(config) is lit
    results = train.train_and_evaluate(config, str(tmp_path / "lit"))
    assert {"zeroshot/acc1", "retrieval/text_retrieval_recall@1"} <= set(results)
    import json  # pylint: disable=import-outside-toplevel

    logged = [json.loads(line) for line in open(tmp_path / "lit" / "metrics.jsonl")]
    logged = [r for r in logged if "train/loss" in r]
    # The family's objective ran, not CLIP's (which logs the temperature).
    assert logged and all("train/logit_scale" not in r and "train/i2t_acc" in r for r in logged)

    mesh = parallel.create_mesh({"data": -1})
    s = train.setup(config, mesh)
    init = jax.device_get(s.init_fn()["params"])
    _, trained, step = train.restore_for_inference(config, str(tmp_path / "lit"))
    trained = jax.device_get(trained)
    assert step == 3
    moved = {part: any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(init[part]), jax.tree.leaves(trained[part]))) for part in init}
    assert moved == {"image": False, "image_projection": False, "text": True,
                     "text_projection": True, "logit_scale": True}
