"""``vlm-jax export`` (vlm_jax/export.py): import the committed fixtures, export them, and
compare with the files they came from (exact: the export is the import's inverse).

* transformers: the CLIPModel / SiglipModel / Siglip2Model fixtures (tests/fixtures/hf_clip)
  -> ``vlm-jax convert`` -> ``export --format hf`` -> every tensor of ``model.safetensors``
  equal to the original's, and the architecture fields of ``config.json`` the same.
* open_clip: the open_clip fixture (tests/fixtures/open_clip/tiny_quickgelu.safetensors)
  -> convert -> ``export --format open_clip`` -> every tensor equal.

The ``interop`` tests (need torch, open_clip and transformers: ``pip install -e
'.[interop]'``) load the exports with ``open_clip.create_model('local-dir:...')`` and
``transformers.AutoModel.from_pretrained`` and compare their embeddings with the references
the libraries computed for the fixtures, and with vlm_jax's own embeddings for models in the
layout training writes (``clip_tiny``, ``siglip_tiny``).
"""
import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from vlm_jax import convert, export, main

HF = pathlib.Path(__file__).parent / "fixtures" / "hf_clip"
OPEN_CLIP = pathlib.Path(__file__).parent / "fixtures" / "open_clip"
NAMES = ["clip", "siglip", "siglip2"]
HF_ARCH = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "hidden_act", "layer_norm_eps", "patch_size", "image_size", "num_patches",
           "vocab_size", "max_position_embeddings", "projection_size", "eos_token_id",
           "bos_token_id", "pad_token_id")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (workdir, export directory)}``: the fixtures converted and exported once."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in NAMES:
        work, dst = root / name, root / f"{name}_hf"
        assert main.main(["convert", "--input", str(HF / name), "--workdir", str(work)]) == 0
        extra = ["--hf_model_type", "siglip2"] if name == "siglip2" else []
        assert main.main(["export", "--workdir", str(work), "--format", "hf", "--output",
                          str(dst)] + extra) == 0
        out[name] = (work, dst)
    work = root / "tiny_quickgelu"
    assert main.main(["convert", "--input", str(OPEN_CLIP / "tiny_quickgelu.safetensors"),
                      "--act", "quick_gelu", "--workdir", str(work)]) == 0
    for name in ("tiny_quickgelu", "clip"):
        src = work if name == "tiny_quickgelu" else out["clip"][0]
        dst = root / f"{name}_open_clip"
        assert main.main(["export", "--workdir", str(src), "--format", "open_clip", "--output",
                          str(dst)]) == 0
        out[f"{name}_open_clip"] = (src, dst)
    return out


def _assert_same_tensors(original: dict, exported_sd: dict, what: str) -> None:
    assert set(original) == set(exported_sd), (what, set(original) ^ set(exported_sd))
    for key, value in original.items():
        assert exported_sd[key].shape == value.shape, (what, key)
        assert exported_sd[key].dtype == np.float32
        np.testing.assert_array_equal(exported_sd[key], value.astype(np.float32),
                                      err_msg=f"{what}: {key}")


@pytest.mark.parametrize("name", NAMES)
def test_hf_round_trip_is_exact(exported, name):
    _, dst = exported[name]
    original = load_file(str(HF / name / "model.safetensors"))
    _assert_same_tensors(original, load_file(str(dst / "model.safetensors")), name)
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (dst, HF / name))
    assert ours["model_type"] == theirs["model_type"]
    for tower in ("vision_config", "text_config"):
        for key in HF_ARCH:
            if key in theirs[tower]:
                assert ours[tower].get(key) == theirs[tower][key], (name, tower, key)
    prep = json.loads((dst / "preprocessor_config.json").read_text())
    expected = json.loads((HF / name / "preprocessor_config.json").read_text())
    assert (prep["image_mean"], prep["image_std"]) == (expected["image_mean"],
                                                       expected["image_std"])
    print(f"{name}: {len(original)} tensors round-trip exactly")


def test_open_clip_round_trip_is_exact(exported):
    _, dst = exported["tiny_quickgelu_open_clip"]
    original = load_file(str(OPEN_CLIP / "tiny_quickgelu.safetensors"))
    original.pop("attn_mask", None)  # A buffer open_clip recomputes.
    _assert_same_tensors(original, load_file(str(dst / "open_clip_model.safetensors")),
                         "tiny_quickgelu")
    cfg = json.loads((dst / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["quick_gelu"] is True and cfg["vision_cfg"]["patch_size"] > 0
    # The Hugging Face CLIP, exported to open_clip and read back by the open_clip importer,
    # gives the parameters it was imported with.
    work, dst = exported["clip_open_clip"]
    params, model_cfg, _ = export.load_workdir(work)
    sd = convert.load_state_dict(dst / "open_clip_model.safetensors")
    again = convert.convert_state_dict(sd, model_cfg)
    flat = export.flat_params(params)
    assert set(again) == set(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(again[key]), value, err_msg=key)


def test_export_refuses_what_the_target_cannot_hold(exported, tmp_path):
    work, dst = exported["siglip"]
    with pytest.raises(export.ExportError, match="MAP head"):
        export.export(work, "open_clip", tmp_path / "a")
    with pytest.raises(export.ExportError, match="exports as"):
        export.export(work, "hf", tmp_path / "b", hf_model_type="clip")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export(work, "hf", dst)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main.main(["export", "--workdir", str(tmp_path / "none"), "--format", "hf",
                      "--output", str(tmp_path / "c")]) == 2


def test_an_averaging_image_tower_exports_to_open_clip_only(tmp_path):
    """pool_type 'avg' is open_clip's; transformers' CLIPVisionModel pools at the class token."""
    work, *_ = _native(tmp_path, "clip_tiny:test", "avg")
    with pytest.raises(export.ExportError, match="pool_type 'tok'.*--format open_clip"):
        export.export(work, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    dst = export.export(work, "open_clip", tmp_path / "oc")
    cfg = json.loads((pathlib.Path(dst) / convert.OPEN_CLIP_CONFIG).read_text())
    assert cfg["model_cfg"]["vision_cfg"]["pool_type"] == "avg"
    # The quickstart's average of all tokens, without a class token, neither library has.
    work, *_ = _native(tmp_path, "clip_tiny")
    for fmt in ("open_clip", "hf"):
        with pytest.raises(export.ExportError, match="class token"):
            export.export(work, fmt, tmp_path / f"gap_{fmt}")
        assert not (tmp_path / f"gap_{fmt}").exists()


def _native(tmp_path, experiment, pool_type=None):
    """A workdir holding a randomly initialised model of ``experiment`` (as training writes
    one; ``pool_type`` replaces the image tower's), its model and fixed inputs."""
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

    name, _, arg = experiment.partition(":")
    config = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "experiments" /
                                        f"{name}.py") + (f":{arg}" if arg else ""))
    if pool_type is not None:
        config.model.image.pool_type = pool_type
    model = get_family(config.model).build_model(config.model, nnx.Rngs(3))
    work = convert.write_workdir(tmp_path / f"{name}_{arg}_{pool_type}",
                                 nnx.state(model).to_pure_dict(), config)
    rng = np.random.default_rng(0)
    size, text = config.model.image.image_size, config.model.text
    images = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    tokens = rng.integers(4, text.vocab_size, (2, text.context_length)).astype(np.int32)
    tokens[0, 0], tokens[0, 5], tokens[0, 6:] = 2, text.eos_id, 0  # bos, words, eos, padding
    tokens[1, 0], tokens[1, -1] = 2, text.eos_id
    return work, model, images, tokens


@pytest.mark.interop
def test_trained_layout_exports_load_in_open_clip_and_transformers(tmp_path):
    """vlm_jax's own CLIP (``clip_tiny``: eos id 3, exact GELU; its image tower pooling the
    patch tokens' average with a class token in the sequence, open_clip's pool_type 'avg', and
    at the class token, which transformers' CLIPModel holds too) and SigLIP-loss model (``siglip_tiny``: a
    logit_bias) exported and loaded by the libraries give the embeddings the vlm_jax model
    computes."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    lines = []
    with torch.no_grad():
        for experiment, pool, formats in (("clip_tiny", "avg", ("open_clip",)),
                                          ("clip_tiny", "tok", ("open_clip", "hf")),
                                          ("siglip_tiny", None, ("open_clip",))):
            work, model, images, tokens = _native(tmp_path, experiment, pool)
            want = model(images, tokens)
            for fmt in formats:
                dst = export.export(work, fmt, tmp_path / f"{experiment}_{pool}_{fmt}")
                pixels, ids = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(
                    tokens).long()
                if fmt == "open_clip":
                    m = open_clip.create_model(f"local-dir:{dst}").eval()
                    got = (m.encode_image(pixels, normalize=True),
                           m.encode_text(ids, normalize=True), m.logit_scale.exp())
                    bias = m.logit_bias
                else:
                    m = transformers.AutoModel.from_pretrained(dst, dtype=torch.float32).eval()
                    res = m(input_ids=ids, pixel_values=pixels)
                    got, bias = (res.image_embeds, res.text_embeds, m.logit_scale.exp()), None
                e = [float(np.abs(np.asarray(a, np.float32) - np.asarray(b)).max())
                     for a, b in zip(got, (want["image_emb"], want["text_emb"],
                                           want["logit_scale"]))]
                if "logit_bias" in want:
                    e.append(abs(float(bias) - float(want["logit_bias"])))
                lines.append(f"{experiment} (pool {pool or 'as configured'}) -> {fmt} "
                             f"({type(m).__name__}): max |diff| image "
                             f"{e[0]:.2e} text {e[1]:.2e} logit scale {e[2]:.2e}"
                             + (f" logit bias {e[3]:.2e}" if len(e) > 3 else ""))
                assert max(e) < 1e-4, lines[-1]
    print("\n" + "\n".join(lines))


@pytest.mark.interop
def test_exports_load_in_open_clip_and_transformers(exported):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")

    def err(a, b):
        return float(np.abs(np.asarray(a, np.float32) - b).max())

    lines = []
    with torch.no_grad():
        for name in NAMES:
            _, dst = exported[name]
            io = np.load(HF / name / "io.npz")
            model = transformers.AutoModel.from_pretrained(
                dst, dtype=torch.float32, attn_implementation="eager").eval()
            pixels = torch.from_numpy(io["pixel_values"]).permute(0, 3, 1, 2)
            kw = dict(pixel_values=pixels)
            if name == "siglip2":  # Patches in (row, column, channel) order, the full grid.
                b, p, g = pixels.shape[0], model.config.vision_config.patch_size, 4
                kw = dict(pixel_values=pixels.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
                          .reshape(b, g * g, p * p * 3),
                          spatial_shapes=torch.tensor([[g, g]] * b),
                          pixel_attention_mask=torch.ones(b, g * g, dtype=torch.long))
            res = model(input_ids=torch.from_numpy(io["input_ids"]).long(), **kw)
            e = (err(res.image_embeds, io["image_embeds"]), err(res.text_embeds, io["text_embeds"]),
                 err(res.logits_per_image, io["logits_per_image"]))
            lines.append(f"transformers {type(model).__name__} ({name}): max |diff| image "
                         f"{e[0]:.2e} text {e[1]:.2e} logits {e[2]:.2e}")
            assert max(e[:2]) < 1e-4 and e[2] < 1e-4 * max(1, np.abs(io["logits_per_image"]).max())
        for name, ref in (("tiny_quickgelu", OPEN_CLIP / "tiny_quickgelu_io.npz"),
                          ("clip", HF / "clip" / "io.npz")):
            _, dst = exported[f"{name}_open_clip"]
            model = open_clip.create_model(f"local-dir:{dst}").eval()
            io = np.load(ref)
            if name == "clip":
                images = torch.from_numpy(io["pixel_values"]).permute(0, 3, 1, 2)
                tokens, want = io["input_ids"], (io["image_embeds"], io["text_embeds"])
            else:
                images, tokens = torch.from_numpy(io["images_nchw"]), io["tokens"]
                want = (io["image_embeddings"], io["text_embeddings"])
            image = model.encode_image(images, normalize=True)
            text = model.encode_text(torch.from_numpy(tokens).long(), normalize=True)
            e = (err(image, want[0]), err(text, want[1]))
            lines.append(f"open_clip create_model('local-dir:...') ({name}): max |diff| image "
                         f"{e[0]:.2e} text {e[1]:.2e}")
            assert max(e) < 1e-4
    print(f"\ntorch {torch.__version__}, open_clip {open_clip.__version__}, transformers "
          f"{transformers.__version__}\n" + "\n".join(lines))
