"""``vlm-jax convert`` against real open_clip output (tests/fixtures/open_clip, made by its
``make_fixture.py`` with open_clip 3.3 / torch 2.14; torch is not needed here).

The fixture holds two small randomly initialised open_clip CLIPs (QuickGELU and GELU), their
image / text embeddings for fixed inputs, open_clip's tokenisation of 500 strings and the state
dict shapes of the released ViT-B/32, B/16 and L/14.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from input_pipeline.tokenizers import CLIP_BPE_PATH, load_tokenizer
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import convert, models, train
from vlm_jax.families import get_family
from vlm_jax.config import load_config, load_json_config

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "open_clip"
TINY = ["tiny_quickgelu", "tiny_gelu"]


def _io(name):
    return np.load(FIXTURE / f"{name}_io.npz")


def _act(name):
    return "quick_gelu" if bool(_io(name)["quick_gelu"]) else "gelu"


def _embeddings(model_cfg, params, io):
    model = get_family(model_cfg).build_model(model_cfg, nnx.Rngs(0))
    nnx.update(model, params)
    img = model.encode_image(jnp.asarray(io["images_nchw"].transpose(0, 2, 3, 1)))
    txt = model.encode_text(jnp.asarray(io["tokens"]))
    return np.asarray(img), np.asarray(txt), float(model.temperature())


def _convert(name, act=None, scan_layers=False):
    sd = convert.load_state_dict(FIXTURE / f"{name}.safetensors")
    cfg = convert.infer_model_config(sd, act=act or _act(name))
    cfg["scan_layers"] = scan_layers
    build = get_family(cfg).build_model
    abstract = nnx.state(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))), nnx.Param)
    return cfg, convert.to_model_params(convert.convert_state_dict(sd, cfg), abstract)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", TINY)
def test_embeddings_match_open_clip(name, scan_layers):
    io = _io(name)
    cfg, params = _convert(name, scan_layers=scan_layers)
    img, txt, scale = _embeddings(cfg, params, io)
    np.testing.assert_allclose(img, io["image_embeddings"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(txt, io["text_embeddings"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(scale, io["logit_scale"], rtol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_wrong_activation_is_visible(name):
    """The parity check can fail: the other activation moves the embeddings far beyond 1e-4."""
    io = _io(name)
    other = "gelu" if _act(name) == "quick_gelu" else "quick_gelu"
    cfg, params = _convert(name, act=other)
    img, txt, _ = _embeddings(cfg, params, io)
    assert np.abs(img - io["image_embeddings"]).max() > 1e-3
    assert np.abs(txt - io["text_embeddings"]).max() > 1e-3


def test_tokenizer_matches_open_clip():
    fx = np.load(FIXTURE / "tokenizer.npz")
    ids = load_tokenizer("clip_bpe", 77).encode(list(fx["strings"]))
    assert ids.shape == fx["ids"].shape == (500, 77)
    mismatched = [s for s, a, b in zip(fx["strings"], ids, fx["ids"]) if not np.array_equal(a, b)]
    assert not mismatched, mismatched[:5]
    assert pathlib.Path(CLIP_BPE_PATH).exists()


@pytest.mark.parametrize("name,preset", [("ViT-B-32", "ViT-B/32"), ("ViT-B-16", "ViT-B/16"),
                                         ("ViT-L-14", "ViT-L/14")])
def test_released_architectures(name, preset):
    """Architecture inferred from the released models' shapes equals the published one, and
    every converted weight lands on a parameter of that shape (checked without memory)."""
    shapes = json.loads((FIXTURE / "released_shapes.json").read_text())[name]
    cfg = convert.infer_model_config(shapes, act="quick_gelu")
    ref = models.clip_config(preset)
    assert cfg["embed_dim"] == ref["embed_dim"]
    ref_vit = models.decode_variant(ref["image"]["variant"])
    for key in ("width", "depth", "num_heads", "mlp_dim", "patch_size"):
        assert cfg["image"][key] == ref_vit[key], key
    assert cfg["image"]["image_size"] == 224
    for key in ("width", "depth", "num_heads", "mlp_dim", "vocab_size", "context_length",
                "eos_id"):
        assert cfg["text"][key] == ref["text"][key], key
    abstract_sd = {k: jax.ShapeDtypeStruct(tuple(v), jnp.float32) for k, v in shapes.items()}
    abstract_sd.pop("attn_mask", None)
    cfg["scan_layers"] = True
    build = get_family(cfg).build_model
    model_params = nnx.state(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))), nnx.Param)
    out = jax.eval_shape(
        lambda sd: convert.to_model_params(convert.convert_state_dict(sd, cfg), model_params),
        abstract_sd)
    assert models.count_params(out) == sum(int(np.prod(v)) for k, v in shapes.items()
                                           if k != "attn_mask")


def test_convert_command_writes_a_checkpoint_eval_restores(tmp_path):
    base = load_config(str(pathlib.Path(__file__).parents[1] / "experiments" / "clip_tiny.py"))
    workdir = convert.convert(str(FIXTURE / "tiny_gelu.safetensors"), str(tmp_path / "run"),
                              act="gelu", base_config=base)
    config = load_json_config(str(workdir / "config.json"))
    assert config.model.image.act == "gelu"
    s = train.setup(config)  # What `vlm-jax eval` does: the run's abstract state and shardings.
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every_steps=1, async_save=False)
    params = ckpt.restore_params(None, s.abstract_state["params"])
    ckpt.close()
    model = nnx.merge(s.graphdef, params)
    io = _io("tiny_gelu")
    img = np.asarray(model.encode_image(jnp.asarray(io["images_nchw"].transpose(0, 2, 3, 1))))
    txt = np.asarray(model.encode_text(jnp.asarray(io["tokens"])))
    np.testing.assert_allclose(img, io["image_embeddings"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(txt, io["text_embeddings"], atol=1e-4, rtol=0)
    with pytest.raises(ckpt_lib.CheckpointError, match="already holds checkpoints"):
        convert.convert(str(FIXTURE / "tiny_gelu.safetensors"), str(workdir), act="gelu",
                        base_config=base)


def test_clear_errors(tmp_path):
    with pytest.raises(convert.ConvertError, match="does not exist"):
        convert.load_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(convert.ConvertError, match="unknown format"):
        (tmp_path / "w.npz").write_bytes(b"")
        convert.load_state_dict(tmp_path / "w.npz")
    sd = convert.load_state_dict(FIXTURE / "tiny_gelu.safetensors")
    with pytest.raises(convert.ConvertError, match="--act"):
        convert.infer_model_config(sd, act="relu")
    no_pos = {k: v for k, v in sd.items() if k != "visual.positional_embedding"}
    with pytest.raises(convert.ConvertError, match="visual.positional_embedding"):
        convert.infer_model_config(no_pos, act="gelu")
    cfg = convert.infer_model_config(sd, act="gelu")
    extra = dict(sd, **{"visual.transformer.resblocks.0.ls_1.gamma": np.ones(64, np.float32)})
    with pytest.raises(convert.ConvertError, match="ls_1"):
        convert.convert_state_dict(extra, cfg)


@pytest.mark.torch
def test_torch_state_dict_formats(tmp_path):
    """open_clip .pt / .bin files (also under 'state_dict' with a DDP 'module.' prefix)."""
    torch = pytest.importorskip("torch")
    sd = convert.load_state_dict(FIXTURE / "tiny_gelu.safetensors")
    torch.save({k: torch.from_numpy(v).half() for k, v in sd.items()}, tmp_path / "a.pt")
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()},
                "epoch": 3}, tmp_path / "b.bin")
    for f in ("a.pt", "b.bin"):
        got = convert.load_state_dict(tmp_path / f)
        assert sorted(got) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(got[k], sd[k])


def _hub_copy(folder, **changes):
    """A copy of the open_clip hub fixture folder at ``folder`` with ``changes`` to its config:
    ``{"model_cfg.vision_cfg.pool_type": "avg", ...}``."""
    folder.mkdir()
    src = FIXTURE / "hub_tiny"
    (folder / "open_clip_model.safetensors").write_bytes(
        (src / "open_clip_model.safetensors").read_bytes())
    oc = json.loads((src / "open_clip_config.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = oc
        for k in parents:
            node = node.setdefault(k, {})
        node[key] = value
    (folder / "open_clip_config.json").write_text(json.dumps(oc))
    return folder


def test_open_clip_config(tmp_path):
    """open_clip_config.json replaces --act and brings the preprocessing; beside a weights file
    too; what vlm_jax would not reproduce, or what contradicts the weights or --act, is refused
    naming the setting."""
    oc = json.loads((FIXTURE / "hub_tiny" / "open_clip_config.json").read_text())
    assert convert.open_clip_settings(oc) == dict(
        act="quick_gelu", resize_mode="shortest", pool_type="tok", image_size=32,
        pixel_mean=[0.5] * 3, pixel_std=[0.5] * 3)
    for dotted, value, match in (("model_cfg.vision_cfg.pool_type", "none", "pool_type"),
                                 ("model_cfg.text_cfg.hf_tokenizer_name", "bert", "tokenizer"),
                                 ("model_cfg.text_cfg.no_causal_mask", True, "no_causal_mask"),
                                 ("preprocess_cfg.resize_mode", "longest", "resize_mode"),
                                 ("preprocess_cfg.interpolation", "bilinear", "interpolation")):
        bad = json.loads(json.dumps(oc))
        section, *keys = dotted.split(".")
        node = bad[section]
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        with pytest.raises(convert.ConvertError, match=match):
            convert.open_clip_settings(bad)
    base = load_config(str(FIXTURE.parents[2] / "experiments" / "clip_openai.py"))
    with pytest.raises(convert.ConvertError, match="image_size=64"):
        convert.convert(str(_hub_copy(tmp_path / "h1", **{"model_cfg.vision_cfg.image_size": 64})),
                        str(tmp_path / "w1"), base_config=base)
    with pytest.raises(convert.ConvertError, match="contradicts"):
        convert.convert(str(FIXTURE / "hub_tiny"), str(tmp_path / "w2"), act="gelu",
                        base_config=base)
    # The weights file with the config beside it (squash resizing), and --dtype.
    folder = _hub_copy(tmp_path / "h2", **{"preprocess_cfg.resize_mode": "squash",
                                    "model_cfg.quick_gelu": False})
    convert.convert(str(folder / "open_clip_model.safetensors"), str(tmp_path / "w3"),
                    base_config=base, dtype="bfloat16")
    config = load_json_config(str(tmp_path / "w3" / "config.json"))
    assert config.model.image.act == config.model.text.act == "gelu"
    assert config.eval.resize_mode == "squash" and config.model.dtype == "bfloat16"


class _RunsCode:
    """Unpickling this calls ``pathlib.Path(marker).write_text('ran')``: the code a malicious
    weight file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def _write_marker(marker):
    return pathlib.Path(marker).write_text("ran")


@pytest.mark.torch
def test_pickle_that_runs_code_is_refused_unrun(tmp_path):
    """A .pt that ``weights_only`` refuses is a ConvertError, not retried with torch.jit.load
    (nor unpickled in full): the code in it never runs. Both torch.save's zip format and the
    legacy pickle format."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "marker"
    payload = {"visual.proj": torch.zeros(2, 2), "evil": _RunsCode(marker)}
    torch.save(payload, tmp_path / "zip.pt")
    torch.save(payload, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert not marker.exists()
    for name in ("zip.pt", "legacy.pt"):
        assert not convert.is_torchscript_archive(tmp_path / name)
        with pytest.raises(convert.ConvertError, match="weights_only=True"):
            convert.load_state_dict(tmp_path / name)
        assert not marker.exists(), f"{name}: the pickle's code ran"
    # The payload does run code when unpickled in full: the test would see it.
    torch.load(tmp_path / "zip.pt", weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.torch
def test_torchscript_archive_still_loads(tmp_path):
    """OpenAI's releases are TorchScript archives: recognised as such, read with jit.load."""
    torch = pytest.importorskip("torch")
    sd = convert.load_state_dict(FIXTURE / "tiny_gelu.safetensors")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, (k, v) in enumerate(sorted(sd.items())):
                self.register_buffer(f"b{i}", torch.from_numpy(v))

        def forward(self, x):
            return x

    torch.jit.save(torch.jit.script(Holder()), tmp_path / "openai.pt")
    assert convert.is_torchscript_archive(tmp_path / "openai.pt")
    got = convert.load_state_dict(tmp_path / "openai.pt")
    want = {f"b{i}": v for i, (k, v) in enumerate(sorted(sd.items()))}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def _cli(repo_root, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", "vlm_jax.main", *args], capture_output=True,
                          text=True, cwd=repo_root, env=env, timeout=600)


@pytest.mark.e2e
def test_convert_then_eval_command(repo_root, tmp_path, shapes_data_dir):
    """The commands a user runs: convert open_clip weights, evaluate them with every evaluator
    (twice, with different evaluators: the results file keeps both)."""
    workdir = tmp_path / "imported"
    config = str(repo_root / "experiments/clip_tiny.py") + ":test"
    proc = _cli(repo_root, "convert", "--input", str(FIXTURE / "tiny_gelu.safetensors"),
                "--act", "gelu", "--workdir", str(workdir), "--config", config,
                f"--config.data.data_dir={shapes_data_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "Converted" in proc.stdout and "act gelu" in proc.stdout
    proc = _cli(repo_root, "eval", "--checkpoint", str(workdir / "checkpoints" / "0"),
                "--evaluators", "zeroshot,linear_probe")
    assert proc.returncode == 0, proc.stderr
    assert "| linear_probe/fewshot_2shot_acc1 |" in proc.stdout
    proc = _cli(repo_root, "eval", "--workdir", str(workdir), "--evaluators", "retrieval")
    assert proc.returncode == 0, proc.stderr
    records = json.loads((workdir / "eval_results_test.json").read_text())
    assert {r["task"] for r in records} == {"zeroshot_classification", "linear_probe",
                                            "zeroshot_retrieval"}
    for r in records:
        assert (r["dataset"], r["split"], r["step"]) == ("shapes", "test", 0)
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values())
    # An entry moved to a TFDS dataset that is not prepared: refused before compute.
    proc = _cli(repo_root, "eval", "--workdir", str(workdir), "--evaluators", "zeroshot",
                "--dataset", "tfds:coco_captions",
                f"--config.eval.data_dir={tmp_path / 'no_tfds'}")
    assert proc.returncode == 2
    assert "coco_captions" in proc.stderr and "tfds build" in proc.stderr
    proc = _cli(repo_root, "convert", "--input", str(tmp_path / "nope.safetensors"),
                "--act", "gelu", "--workdir", str(tmp_path / "x"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
