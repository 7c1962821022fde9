"""Hugging Face CLIP / SigLIP / SigLIP 2 import (``vlm_jax.interop_hf``) against real
``transformers`` output (tests/fixtures/hf_clip, made by its ``make_fixture.py`` with
transformers 5.24 / torch 2.14; neither is needed here).

The fixture holds a small random ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` as
``save_pretrained`` wrote them (float16, with their tokenizers), transformers' float32
embeddings, logits, logit scale and bias for fixed inputs, and the tokenizers' ids for tricky
strings (unicode, extra spaces, punctuation, HTML entities, empty, overlong).
"""
import json
import pathlib
import pickle
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from input_pipeline.tokenizers import HfTextTokenizer, load_tokenizer
from vlm_jax import interop_hf, main
from vlm_jax.convert import ConvertError
from vlm_jax.families import get_family

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf_clip"
NAMES = ["clip", "siglip", "siglip2"]


def _io(name):
    return np.load(FIXTURE / name / "io.npz")


def _model(params, cfg):
    model = get_family(cfg).build_model(cfg, nnx.Rngs(0))
    nnx.update(model, params)
    return model


@pytest.mark.parametrize("name,scan", [("clip", False), ("siglip", False), ("siglip2", False),
                                       ("siglip", True)])
def test_embeddings_match_transformers(name, scan):
    io = _io(name)
    params, cfg, model_type = interop_hf.convert_hf_clip(FIXTURE / name, scan_layers=scan)
    assert model_type == name and cfg.get("scan_layers", False) == scan
    forward = nnx.jit(lambda m, x, t: m(x, t))  # One compile instead of op-by-op dispatch.
    out = forward(_model(params, cfg), jnp.asarray(io["pixel_values"]),
                  jnp.asarray(io["input_ids"]))
    image, text = np.asarray(out["image_emb"]), np.asarray(out["text_emb"])
    scale = float(out["logit_scale"])
    logits = scale * image @ text.T + float(out.get("logit_bias", 0.0))
    errors = dict(image=np.abs(image - io["image_embeds"]).max(),
                  text=np.abs(text - io["text_embeds"]).max(),
                  logits=np.abs(logits - io["logits_per_image"]).max())
    print(f"{name}: max |diff| image {errors['image']:.2e} text {errors['text']:.2e} "
          f"logits {errors['logits']:.2e}; logit_scale exp {scale:.6f} vs "
          f"{np.exp(io['logit_scale']):.6f}"
          + (f", logit_bias {float(out['logit_bias']):.6f} vs {float(io['logit_bias']):.6f}"
             if "logit_bias" in io else ""))
    assert errors["image"] < 1e-4 and errors["text"] < 1e-4, errors
    assert errors["logits"] < 1e-4 * max(1.0, np.abs(io["logits_per_image"]).max()), errors
    np.testing.assert_allclose(scale, np.exp(io["logit_scale"]), rtol=1e-6)
    assert ("logit_bias" in out) == ("logit_bias" in io)
    if "logit_bias" in io:
        np.testing.assert_allclose(float(out["logit_bias"]), io["logit_bias"], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_token_ids_match_transformers(name, tmp_path):
    io = _io(name)
    length = io["tricky_ids"].shape[1]  # 64: longer than the model's context, to see more
    spec, vocab_file = interop_hf.hf_tokenizer_spec(FIXTURE / name, name, length)
    shutil.copyfile(vocab_file, tmp_path / vocab_file.name)
    (tmp_path / "tokenizer_spec.json").write_text(json.dumps(spec))
    tok = HfTextTokenizer(tmp_path / "tokenizer_spec.json", length)
    texts = [str(t) for t in io["tricky_texts"]]
    ids = tok.encode(texts)
    wrong = [(t, a.tolist(), b.tolist()) for t, a, b in zip(texts, ids, io["tricky_ids"])
             if not np.array_equal(a, b)]
    print(f"{name}: {len(texts) - len(wrong)}/{len(texts)} tricky strings tokenised as "
          f"transformers does ({spec['kind']}, padding {spec['padding_side']})")
    assert not wrong, wrong
    short = HfTextTokenizer(tmp_path / "tokenizer_spec.json", io["input_ids"].shape[1])
    np.testing.assert_array_equal(short.encode(["a photo of a dog", "a red circle left of a "
                                                "blue square, twice"]), io["input_ids"])


def test_convert_command_writes_workdir_with_tokenizer(tmp_path):
    """``vlm-jax convert`` detects the folder by its model_type; the workdir's config names the
    copied tokenizer, which encodes as transformers' does."""
    work = tmp_path / "siglip2"
    assert main.main(["convert", "--input", str(FIXTURE / "siglip2"), "--workdir",
                      str(work)]) == 0
    config = json.loads((work / "config.json").read_text())
    assert config["model"]["image"]["pool_type"] == "map"
    assert config["model"]["image"]["pixel_mean"] == [0.5, 0.5, 0.5]
    assert config["model"]["project_image"] is False
    io = _io("siglip2")
    tok = load_tokenizer(config["data"]["tokenizer"], io["tricky_ids"].shape[1])
    tok = pickle.loads(pickle.dumps(tok))  # As grain's worker processes receive it.
    np.testing.assert_array_equal(tok.encode([str(t) for t in io["tricky_texts"]]),
                                  io["tricky_ids"])
    # --act belongs to state dict files, and a second convert into the same workdir is refused.
    assert main.main(["convert", "--input", str(FIXTURE / "siglip"), "--workdir",
                      str(tmp_path / "x"), "--act", "gelu"]) == 2
    assert main.main(["convert", "--input", str(FIXTURE / "clip"), "--workdir", str(work)]) == 2


def test_unmapped_weights_and_unsupported_configs_are_refused(tmp_path):
    sd, hf_config = interop_hf.load_hf_lm(FIXTURE / "siglip")
    cfg = interop_hf.hf_clip_config(hf_config)
    sd["vision_model.head.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConvertError, match="vision_model.head.extra.weight"):
        interop_hf.convert_hf_clip_state_dict(sd, cfg, "siglip")
    del sd["vision_model.head.extra.weight"], sd["logit_bias"]
    with pytest.raises(ConvertError, match="logit_bias"):
        interop_hf.convert_hf_clip_state_dict(sd, cfg, "siglip")
    bad = json.loads(json.dumps(hf_config))
    bad["vision_config"]["hidden_act"] = "swish"
    with pytest.raises(ConvertError, match="vision_config.hidden_act"):
        interop_hf.hf_clip_config(bad)
    _, hf2 = interop_hf.load_hf_lm(FIXTURE / "siglip2")
    hf2["vision_config"]["num_patches"] = 12
    with pytest.raises(ConvertError, match="num_patches=12"):
        interop_hf.hf_clip_config(hf2)
    # A CLIP folder without its BPE files names them.
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURE / "clip" / f, tmp_path / f)
    with pytest.raises(ConvertError, match="merges.txt"):
        interop_hf.hf_tokenizer_spec(tmp_path, "clip", 16)
