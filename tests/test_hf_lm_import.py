"""Hugging Face LLaMA / GPT-2 import (``convert.convert_hf_lm``) against real ``transformers``
output (tests/fixtures/hf_lm, made by its ``make_fixture.py`` with transformers 5.24 / torch
2.14; neither is needed here).

The fixture holds a small random ``LlamaForCausalLM`` (grouped-query attention, untied head,
non-default ``rope_theta``) and ``GPT2LMHeadModel`` (tied embeddings) as ``save_pretrained``
wrote them, their float32 logits for a batch with a left-padded row, and
``generate(do_sample=False)``'s tokens for left-padded prompts.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlm_jax import convert, decoding, main, train
from vlm_jax.config import load_config, load_json_config
from vlm_jax.families import get_family

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf_lm"
NAMES = ["llama", "gpt2"]


def _io(name):
    return np.load(FIXTURE / name / "io.npz")


def _model(params, cfg):
    model = get_family(cfg).build_model(cfg, nnx.Rngs(0))
    nnx.update(model, params)
    return model


def _logits(model, io):
    return np.asarray(model(jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])))


def _max_error(logits, io):
    """Largest difference to the reference on the real tokens (padding positions are
    undefined), and the tolerance: 1e-4 of the logits' scale."""
    valid = io["attention_mask"].astype(bool)
    ref = io["logits"]
    return np.abs(logits - ref)[valid].max(), 1e-4 * max(1.0, np.abs(ref[valid]).max())


@pytest.mark.parametrize("name,scan", [("llama", False), ("gpt2", False), ("llama", True)])
def test_logits_match_transformers(name, scan):
    io = _io(name)
    params, cfg = convert.convert_hf_lm(FIXTURE / name, scan_layers=scan)
    assert cfg["name"] == "lm" and cfg["style"] == name
    assert cfg.get("scan_layers", False) == scan
    err, tol = _max_error(_logits(_model(params, cfg), io), io)
    assert err < tol, (err, tol)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers_generate(name):
    io = _io(name)
    model = _model(*convert.convert_hf_lm(FIXTURE / name))
    prompt = io["prompt_ids"]
    tokens = decoding.generate(model, prompt=prompt, prompt_valid=io["prompt_mask"],
                               max_new_tokens=io["generated"].shape[1])
    np.testing.assert_array_equal(np.asarray(tokens)[:, prompt.shape[1]:], io["generated"])


def test_config_of_the_fixtures():
    _, llama = convert.load_hf_lm(FIXTURE / "llama")
    _, gpt2 = convert.load_hf_lm(FIXTURE / "gpt2")
    assert convert.hf_lm_config(llama) == dict(
        name="lm", style="llama", vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=2,
        head_dim=16, mlp_dim=96, max_length=64, norm_eps=1e-6, rope_theta=1000.0,
        tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0)
    assert convert.hf_lm_config(gpt2) == dict(
        name="lm", style="gpt2", vocab_size=128, width=64, depth=2, num_heads=4, num_kv_heads=4,
        mlp_dim=256, max_length=64, norm_eps=1e-5, tie_embeddings=True, bos_id=1, eos_id=2,
        pad_id=0)
    # transformers 4 spelling of the rotary base, and a list of end tokens (Llama 3).
    v4 = {k: v for k, v in llama.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling=None, eos_token_id=[7, 9])
    cfg = convert.hf_lm_config(v4)
    assert cfg["rope_theta"] == 500000.0 and cfg["eos_id"] == 7


def test_parity_check_can_fail():
    """A wrong rotary base (the default 10000 instead of the fixture's 1000) moves the logits
    far beyond the tolerance."""
    io = _io("llama")
    sd, hf_config = convert.load_hf_lm(FIXTURE / "llama")
    hf_config = dict(hf_config, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    err, tol = _max_error(_logits(_model(*convert.convert_hf_lm(sd, hf_config)), io), io)
    assert err > 100 * tol


def test_bare_trunk_keys_and_buffers():
    """``GPT2Model`` / ``LlamaModel`` key layouts (no ``transformer.`` / ``model.`` prefix, as the
    original ``gpt2`` checkpoint) and the recomputed buffers older savers kept."""
    for name, prefix, buffers in (
            ("gpt2", "transformer.", ["h.0.attn.bias", "h.1.attn.masked_bias"]),
            ("llama", "model.", ["layers.0.self_attn.rotary_emb.inv_freq"])):
        sd, hf_config = convert.load_hf_lm(FIXTURE / name)
        bare = {k.removeprefix(prefix): v for k, v in sd.items()}
        bare.update({k: np.ones((4,), np.float32) for k in buffers})
        want, _ = convert.convert_hf_lm(FIXTURE / name)
        got, _ = convert.convert_hf_lm(bare, hf_config)
        flat_want, flat_got = _flat(want), _flat(got)
        assert flat_want.keys() == flat_got.keys()
        for k in flat_want:
            np.testing.assert_array_equal(flat_got[k], flat_want[k])


def _flat(tree):
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sd_config(name):
    return convert.load_hf_lm(FIXTURE / name)


@pytest.mark.parametrize("name,edit,match", [
    ("llama", lambda sd, c: sd.pop("model.layers.1.mlp.up_proj.weight"),
     "model.layers.1.mlp.up_proj.weight"),
    ("llama", lambda sd, c: sd.pop("lm_head.weight"), "lm_head.weight"),
    ("gpt2", lambda sd, c: sd.pop("transformer.wpe.weight"), "transformer.wpe.weight"),
    ("llama", lambda sd, c: sd.update({"model.layers.0.self_attn.q_proj.bias":
                                       np.zeros(64, np.float32)}),
     "model.layers.0.self_attn.q_proj.bias"),
    ("gpt2", lambda sd, c: sd.update({"transformer.h.2.ln_1.weight": np.ones(64, np.float32)}),
     "transformer.h.2.ln_1.weight"),
    ("gpt2", lambda sd, c: sd.update({"lm_head.weight": sd["transformer.wte.weight"] + 1}),
     "lm_head.weight"),
    ("llama", lambda sd, c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                      "rope_theta": 500000.0}), "rope_type"),
    ("llama", lambda sd, c: (c.pop("rope_parameters"),
                             c.update(rope_scaling={"type": "linear", "factor": 2.0})),
     "rope_scaling"),
    ("llama", lambda sd, c: c.update(attention_bias=True), "attention_bias"),
    ("llama", lambda sd, c: c.update(hidden_act="gelu"), "hidden_act"),
    ("llama", lambda sd, c: c.pop("hidden_size"), "hidden_size"),
    ("llama", lambda sd, c: c.update(model_type="mistral"), "model_type='mistral'"),
    ("gpt2", lambda sd, c: c.update(activation_function="gelu"), "activation_function"),
    ("gpt2", lambda sd, c: c.update(scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx"),
    ("gpt2", lambda sd, c: c.update(vocab_size=100), "token_embed.embedding"),
])
def test_errors_name_the_key(name, edit, match):
    sd, hf_config = _sd_config(name)
    edit(sd, hf_config)
    with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
        convert.convert_hf_lm(sd, hf_config)


def test_missing_files(tmp_path):
    with pytest.raises(convert.ConvertError, match="config.json"):
        convert.convert_hf_lm(tmp_path)
    (tmp_path / "config.json").write_text((FIXTURE / "gpt2" / "config.json").read_text())
    with pytest.raises(convert.ConvertError, match="model.safetensors"):
        convert.convert_hf_lm(tmp_path)
    sd, _ = _sd_config("gpt2")
    with pytest.raises(convert.ConvertError, match="config.json contents"):
        convert.convert_hf_lm(sd)


def test_convert_writes_a_workdir_restore_uses(tmp_path):
    base = load_config(str(pathlib.Path(__file__).parents[1] / "experiments" / "clip_tiny.py"))
    workdir = convert.convert(str(FIXTURE / "llama"), str(tmp_path / "run"), base_config=base)
    config = load_json_config(str(workdir / "config.json"))
    assert config.model.name == "lm" and config.model.style == "llama"
    s, params, step = train.restore_for_inference(config, workdir)
    assert step == 0
    io = _io("llama")
    err, tol = _max_error(_logits(nnx.merge(s.graphdef, params), io), io)
    assert err < tol, (err, tol)
    with pytest.raises(convert.ConvertError, match="--act"):
        convert.convert(str(FIXTURE / "llama"), str(tmp_path / "other"), act="gelu",
                        base_config=base)


def test_convert_command(tmp_path, capsys):
    config = str(pathlib.Path(__file__).parents[1] / "experiments" / "clip_tiny.py")
    workdir = tmp_path / "gpt2"
    assert main.main(["convert", "--input", str(FIXTURE / "gpt2"), "--workdir", str(workdir),
                      "--config", config]) == 0
    assert "gpt2 64x2" in capsys.readouterr().out
    assert (workdir / "config.json").exists() and (workdir / "checkpoints" / "0").exists()
    # A CLIP state dict without --act: refused with the reason.
    clip = pathlib.Path(__file__).parent / "fixtures" / "open_clip" / "tiny_gelu.safetensors"
    assert main.main(["convert", "--input", str(clip), "--workdir", str(tmp_path / "clip"),
                      "--config", config]) == 2
    assert "--act" in capsys.readouterr().err
