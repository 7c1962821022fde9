"""Import OpenAI CLIP / open_clip weights and Hugging Face LLaMA / GPT-2 language models:
``vlm-jax convert``.

    vlm-jax convert --input ViT-B-32.safetensors --workdir runs/openai_b32 --act quick_gelu
    vlm-jax convert --input CLIP-ViT-B-32-laion2B-s34B-b79K/ --workdir runs/laion_b32  # hub folder
    vlm-jax eval --workdir runs/openai_b32 --evaluators imagenet --config.eval.data_dir=DIR
    vlm-jax convert --input TinyLlama-1.1B/ --workdir runs/tinyllama   # config.json + safetensors

Reads a ViT CLIP state dict in OpenAI's key layout, which open_clip keeps for its ``CLIP`` class
(``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``,
``token_embedding.weight``, ``text_projection``, ``logit_scale``...), infers the architecture
from the shapes (as open_clip's ``build_model_from_openai_state_dict`` does: head width 64), and
writes an orbax checkpoint of ``vlm_jax.models.CLIP`` parameters plus a ``config.json`` so that
``vlm-jax eval`` (or ``train``, to fine-tune) runs on it.

Formats: ``.safetensors`` (numpy only; float16 / bfloat16 / float32), and with torch installed
``.pt`` / ``.bin`` / ``.pth`` (open_clip's state dicts, optionally under ``state_dict`` with a
``module.`` prefix, and OpenAI's TorchScript archives).

The activation is not in the weights: OpenAI's models and open_clip's ``*-quickgelu`` models
use QuickGELU (``--act quick_gelu``), open_clip's other LAION models exact GELU (``--act gelu``).
A wrong choice still loads and silently costs accuracy, so the command asks for it, unless an
``open_clip_config.json`` comes with the weights (open_clip's model folders on the Hugging Face
hub): the activation, image size, pixel mean / std and resize mode are then read from it.

The workdir's model computes in float32 (``--dtype``; bfloat16 moves embeddings by ~1e-3).
PyTorch files are read with ``torch.load(weights_only=True)``, or as TorchScript archives
(OpenAI's releases); any other pickle is refused unread, since unpickling can run code.

Covered: the ViT-B/32, B/16, L/14 (and other ViT) families of OpenAI and open_clip, and open_clip's
CoCa (``coca_ViT-B-32``, ``coca_ViT-L-14``: recognised by its ``text_decoder``). Not covered,
with an error naming the keys: ModifiedResNet towers (RN50...), timm or Hugging Face towers,
attentional pooling and layer scale.

**Language models** (:func:`convert_hf_lm`): a Hugging Face model directory (``config.json`` +
``model.safetensors``, as ``save_pretrained`` writes it) of a ``LlamaForCausalLM`` or
``GPT2LMHeadModel`` becomes a :class:`vlm_jax.models.lm.LanguageModel` (model config ``name='lm'``),
whose arithmetic follows those classes. The architecture comes from ``config.json``; features
the model lacks (scaled rotary embeddings such as Llama 3.1's, biases in LLaMA attention,
another activation...) are refused with an error naming the field, and every weight must be
mapped (only recomputed buffers, ``rotary_emb.inv_freq`` and GPT-2's ``attn.bias``, are
skipped).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vlm_jax.weights import (  # noqa: F401  (re-exported: convert.X is public)
    ConvertError, _Tracked, _hf, _ln, is_torchscript_archive, load_hf_lm,
    load_state_dict, to_model_params, write_workdir)

ACTIVATIONS = ("quick_gelu", "gelu")
HEAD_WIDTH = 64  # OpenAI / open_clip ViT CLIPs: heads = width // 64.


# -------------------------------------------------------------------------------------------
# Reading state dicts.
# -------------------------------------------------------------------------------------------


# -------------------------------------------------------------------------------------------
# Architecture from shapes.
# -------------------------------------------------------------------------------------------


def _num_layers(shapes: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _shape(shapes: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConvertError(
            f"The state dict has no {key!r}: not a ViT CLIP in OpenAI / open_clip layout "
            "(ModifiedResNet, timm and Hugging Face towers are not supported). Keys present "
            f"start with: {sorted({k.split('.')[0] for k in shapes})}.")
    return tuple(int(s) for s in shapes[key])


def infer_model_config(shapes: Mapping[str, Any], *, act: str) -> dict:
    """The ``vlm_jax`` CLIP model config (``model.*``) of a state dict, from its shapes alone.

    Args:
      shapes: key -> shape (arrays or shape tuples).
      act: ``'quick_gelu'`` (OpenAI, open_clip ``-quickgelu``) or ``'gelu'`` (open_clip LAION).
    """
    if act not in ACTIVATIONS:
        raise ConvertError(f"--act {act!r}: use one of {ACTIVATIONS} (quick_gelu for OpenAI's "
                           "models and open_clip's *-quickgelu ones, gelu for the others).")
    shapes = {k: getattr(v, "shape", v) for k, v in shapes.items()}
    vw, _, patch, _ = _shape(shapes, "visual.conv1.weight")
    tokens = _shape(shapes, "visual.positional_embedding")[0]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ConvertError(f"visual.positional_embedding has {tokens} rows: not 1 + a square "
                           "grid of patches.")
    tw = _shape(shapes, "ln_final.weight")[0]
    ctx, _ = _shape(shapes, "positional_embedding")
    vocab, _ = _shape(shapes, "token_embedding.weight")
    embed_dim = _shape(shapes, "text_projection")[1]
    vdepth = _num_layers(shapes, "visual.transformer.resblocks.")
    tdepth = _num_layers(shapes, "transformer.resblocks.")
    image = dict(width=vw, depth=vdepth, num_heads=max(1, vw // HEAD_WIDTH), patch_size=patch,
                 mlp_dim=_shape(shapes, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
                 image_size=grid * patch, pool_type="tok", pre_norm=True, patch_bias=False,
                 act=act)
    text = dict(width=tw, depth=tdepth, num_heads=max(1, tw // HEAD_WIDTH),
                mlp_dim=_shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight")[0],
                vocab_size=vocab, context_length=ctx, eos_id=vocab - 1, act=act)
    return dict(name="clip", embed_dim=embed_dim, image=image, text=text,
                logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0),
                dtype="float32", remat="none", scan_layers=False)


# -------------------------------------------------------------------------------------------
# Weights.
# -------------------------------------------------------------------------------------------


def _attn(out, dst, sd, src, heads):
    """torch ``nn.MultiheadAttention`` (fused ``in_proj_weight``, or ``q|k|v_proj_weight`` when
    the key width differs, as in CoCa's pooler) -> query / key / value / out kernels."""
    d = sd[src + "out_proj.weight"].shape[0]
    hd = d // heads
    if src + "in_proj_weight" in sd:
        w = sd[src + "in_proj_weight"]
        ws = [w[:d], w[d:2 * d], w[2 * d:]]
    else:
        ws = [sd[src + f"{n}_proj_weight"] for n in "qkv"]
    b = sd[src + "in_proj_bias"]
    for i, name in enumerate(("query", "key", "value")):
        out[f"{dst}{name}.kernel"] = ws[i].T.reshape(-1, heads, hd)
        out[f"{dst}{name}.bias"] = b[i * d:(i + 1) * d].reshape(heads, hd)
    out[f"{dst}out.kernel"] = sd[src + "out_proj.weight"].T.reshape(heads, hd, d)
    out[f"{dst}out.bias"] = sd[src + "out_proj.bias"]


def _resblock(out, dst, sd, src, heads, norms=(("norm1", "ln_1"), ("norm2", "ln_2"))):
    _attn(out, dst + "attn.", sd, src + "attn.", heads)
    for ours, theirs in norms:
        _ln(out, dst + ours, sd, src + theirs)
    out[dst + "mlp.fc1.kernel"] = sd[src + "mlp.c_fc.weight"].T
    out[dst + "mlp.fc1.bias"] = sd[src + "mlp.c_fc.bias"]
    out[dst + "mlp.fc2.kernel"] = sd[src + "mlp.c_proj.weight"].T
    out[dst + "mlp.fc2.bias"] = sd[src + "mlp.c_proj.bias"]


def convert_state_dict(sd: Mapping[str, Any], model_config: Mapping) -> dict[str, Any]:
    """open_clip / OpenAI keys -> flat ``vlm_jax`` parameter paths (``image.encoder.blocks.0.
    attn.query.kernel``...), one entry per layer. Works on numpy arrays and on jax arrays or
    tracers alike (``jax.eval_shape`` checks a whole ViT-L/14 without memory).

    Raises ConvertError naming any key that would be left unused (layer scale, attention
    pooling...), so nothing is silently dropped.
    """
    sd = _Tracked(sd)
    out: dict[str, Any] = {}
    img, txt = model_config["image"], model_config["text"]
    out["image.patch_embed.kernel"] = sd["visual.conv1.weight"].transpose(2, 3, 1, 0)
    out["image.cls_token"] = sd["visual.class_embedding"]
    out["image.pos_embed"] = sd["visual.positional_embedding"]
    _ln(out, "image.pre_norm", sd, "visual.ln_pre")
    _ln(out, "image.final_norm", sd, "visual.ln_post")
    for i in range(img["depth"]):
        _resblock(out, f"image.encoder.blocks.{i}.", sd, f"visual.transformer.resblocks.{i}.",
                  img["num_heads"])
    out["image_projection.kernel"] = sd["visual.proj"]
    out["text.token_embed.embedding"] = sd["token_embedding.weight"]
    out["text.pos_embed"] = sd["positional_embedding"]
    _ln(out, "text.final_norm", sd, "ln_final")
    for i in range(txt["depth"]):
        _resblock(out, f"text.encoder.blocks.{i}.", sd, f"transformer.resblocks.{i}.",
                  txt["num_heads"])
    out["text_projection.kernel"] = sd["text_projection"]
    out["logit_scale"] = sd["logit_scale"].reshape(())  # () or (1,), as the saver wrote it
    unused = sorted(set(sd) - sd.used)
    if unused:
        raise ConvertError(
            f"{len(unused)} weights have no counterpart in vlm_jax's CLIP (e.g. {unused[:4]}): "
            "this model has parts (layer scale, attentional pooling, another text tower...) that "
            "the converter does not map.")
    return out


# -------------------------------------------------------------------------------------------
# CoCa (open_clip's CoCa class: visual.attn_pool, text.*, text_decoder.*).
# -------------------------------------------------------------------------------------------


def is_coca(shapes: Mapping[str, Any]) -> bool:
    """Whether a state dict is an open_clip CoCa (it has a multimodal text decoder)."""
    return "text_decoder.ln_final.weight" in shapes


def infer_coca_config(shapes: Mapping[str, Any], *, act: str = "gelu",
                      pooler_heads: int = 8) -> dict:
    """The ``vlm_jax`` CoCa model config of an open_clip CoCa state dict, from its shapes
    (head width 64 in the towers and the decoder, as open_clip's configs; the pooler's head
    count is not in the shapes: open_clip's ``attn_pooler_heads``, 8 in its configs)."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    vw, _, patch, _ = _shape(shapes, "visual.conv1.weight")
    grid = math.isqrt(_shape(shapes, "visual.positional_embedding")[0] - 1)
    tw = _shape(shapes, "text.ln_final.weight")[0]
    vocab = _shape(shapes, "text.token_embedding.weight")[0]
    embed_dim = _shape(shapes, "text.text_projection")[1]
    image = dict(width=vw, depth=_num_layers(shapes, "visual.transformer.resblocks."),
                 num_heads=max(1, vw // HEAD_WIDTH), patch_size=patch, image_size=grid * patch,
                 mlp_dim=_shape(shapes, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
                 pre_norm=True, patch_bias=False, act=act)
    text = dict(width=tw, depth=_num_layers(shapes, "text.transformer.resblocks."),
                num_heads=max(1, tw // HEAD_WIDTH),
                mlp_dim=_shape(shapes, "text.transformer.resblocks.0.mlp.c_fc.weight")[0],
                vocab_size=vocab, context_length=_shape(shapes, "text.positional_embedding")[0] - 1,
                bos_id=vocab - 2, eos_id=vocab - 1, pad_id=0, act=act)
    dw = _shape(shapes, "text_decoder.ln_final.weight")[0]
    decoder = dict(depth=_num_layers(shapes, "text_decoder.resblocks."),
                   num_heads=max(1, dw // HEAD_WIDTH),
                   mlp_dim=_shape(shapes, "text_decoder.resblocks.0.mlp.c_fc.weight")[0])
    pooler = dict(n_queries=_shape(shapes, "visual.attn_pool.query")[0], num_heads=pooler_heads,
                  mode="single")
    return dict(name="coca", embed_dim=embed_dim, image=image, text=text, decoder=decoder,
                pooler=pooler, logit_scale_init=math.log(1 / 0.07),
                logit_scale_max=math.log(100.0), dtype="float32", remat="none",
                scan_layers=False)


def convert_coca_state_dict(sd: Mapping[str, Any], model_config: Mapping) -> dict[str, Any]:
    """open_clip CoCa keys -> flat ``vlm_jax`` CoCa parameter paths (one to one; the table is
    in :mod:`vlm_jax.models.coca`). Raises ConvertError naming any key left unused."""
    sd = _Tracked(sd)
    cfg = model_config
    out = {"image.patch_embed.kernel": sd["visual.conv1.weight"].transpose(2, 3, 1, 0),
           "image.cls_token": sd["visual.class_embedding"],
           "image.pos_embed": sd["visual.positional_embedding"],
           "image.pooler.query": sd["visual.attn_pool.query"],
           "image_projection.kernel": sd["visual.proj"],
           "text.token_embed.embedding": sd["text.token_embedding.weight"],
           "text.cls_token": sd["text.cls_emb"],
           "text.pos_embed": sd["text.positional_embedding"],
           "text_projection.kernel": sd["text.text_projection"],
           "decoder.vocab_projection.kernel": sd["text_decoder.text_projection"],
           "logit_scale": sd["logit_scale"].reshape(())}
    for ours, theirs in (("image.pre_norm", "visual.ln_pre"), ("image.final_norm", "visual.ln_post"),
                         ("image.pooler.norm_q", "visual.attn_pool.ln_q"),
                         ("image.pooler.norm_kv", "visual.attn_pool.ln_k"),
                         ("text.final_norm", "text.ln_final"),
                         ("decoder.final_norm", "text_decoder.ln_final")):
        _ln(out, ours, sd, theirs)
    _attn(out, "image.pooler.attn.", sd, "visual.attn_pool.attn.", cfg["pooler"]["num_heads"])
    for i in range(cfg["image"]["depth"]):
        _resblock(out, f"image.encoder.blocks.{i}.", sd, f"visual.transformer.resblocks.{i}.",
                  cfg["image"]["num_heads"])
    for i in range(cfg["text"]["depth"]):
        _resblock(out, f"text.encoder.blocks.{i}.", sd, f"text.transformer.resblocks.{i}.",
                  cfg["text"]["num_heads"])
    heads = cfg["decoder"].get("num_heads", cfg["text"]["num_heads"])
    for i in range(cfg["decoder"].get("depth", cfg["text"]["depth"])):
        _resblock(out, f"decoder.blocks.{i}.self_block.", sd, f"text_decoder.resblocks.{i}.",
                  heads)
        _resblock(out, f"decoder.blocks.{i}.cross_block.", sd, f"text_decoder.cross_attn.{i}.",
                  heads, norms=(("norm1", "ln_1"), ("norm1_kv", "ln_1_kv"), ("norm2", "ln_2")))
    unused = sorted(set(sd) - sd.used - {"text.attn_mask", "attn_mask"})
    if unused:
        raise ConvertError(f"{len(unused)} CoCa weights have no counterpart in vlm_jax's CoCa "
                           f"(e.g. {unused[:4]}): a variant the converter does not map.")
    return out


# -------------------------------------------------------------------------------------------
# Hugging Face causal language models (LlamaForCausalLM, GPT2LMHeadModel) -> models.lm.
# -------------------------------------------------------------------------------------------

HF_LM_TYPES = ("llama", "gpt2")
_GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # All tanh-approximated GELU.
# Buffers that HF state dicts may hold and the model recomputes: rotary frequencies, GPT-2's
# causal mask.
_HF_BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.attn\.(bias|masked_bias)$")


def is_hf_lm(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is a directory, read as a Hugging Face model (``config.json`` +
    ``model.safetensors``): every directory goes this way, state dict files the CLIP way."""
    return pathlib.Path(path).is_dir()


def _hf_require(hf_config: Mapping, key: str, default: Any, allowed: tuple, why: str) -> None:
    value = hf_config.get(key, default)
    if value not in allowed:
        raise ConvertError(f"config.json {key}={value!r} is not supported: {why}.")


def _hf_token_id(hf_config: Mapping, key: str) -> int | None:
    value = hf_config.get(key)
    if isinstance(value, (list, tuple)):  # e.g. Llama 3's [end_of_text, eot]: the first one.
        value = value[0] if value else None
    return None if value is None else int(value)


def _hf_rope_theta(hf_config: Mapping) -> float:
    """Rotary base of a LLaMA config: ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4); only unscaled rotary embeddings are supported."""
    params = hf_config.get("rope_parameters")
    if params is not None:
        _hf_require(params, "rope_type", "default", ("default",),
                    "only unscaled rotary embeddings (rope_parameters.rope_type 'default')")
        _hf_require(params, "partial_rotary_factor", 1.0, (1.0,),
                    "rotary embeddings on every feature of a head")
        return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    scaling = hf_config.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ConvertError(f"config.json rope_scaling={scaling!r} is not supported: only "
                           "unscaled rotary embeddings (rope_scaling null).")
    return float(hf_config.get("rope_theta", 10000.0))


def hf_lm_config(hf_config: Mapping) -> dict:
    """The ``vlm_jax`` model config (``name='lm'``) of a Hugging Face ``config.json`` of
    ``model_type`` ``'llama'`` or ``'gpt2'``. Raises ConvertError naming the field of a feature
    :class:`~vlm_jax.models.lm.LanguageModel` does not have (scaled rotary embeddings,
    attention / MLP biases in LLaMA, another activation...)."""
    model_type = hf_config.get("model_type")
    if model_type == "llama":
        _hf_require(hf_config, "hidden_act", "silu", ("silu",), "LLaMA's MLP is SwiGLU (silu)")
        _hf_require(hf_config, "attention_bias", False, (False,),
                    "LLaMA-style attention has no biases")
        _hf_require(hf_config, "mlp_bias", False, (False,), "LLaMA-style MLPs have no biases")
        width, heads = _hf(hf_config, "hidden_size"), _hf(hf_config, "num_attention_heads")
        cfg = dict(name="lm", style="llama", vocab_size=_hf(hf_config, "vocab_size"),
                   width=width, depth=_hf(hf_config, "num_hidden_layers"), num_heads=heads,
                   num_kv_heads=_hf(hf_config, "num_key_value_heads", heads),
                   head_dim=_hf(hf_config, "head_dim", width // heads),
                   mlp_dim=_hf(hf_config, "intermediate_size"),
                   max_length=_hf(hf_config, "max_position_embeddings"),
                   norm_eps=float(_hf(hf_config, "rms_norm_eps", 1e-6)),
                   rope_theta=_hf_rope_theta(hf_config),
                   tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
    elif model_type == "gpt2":
        _hf_require(hf_config, "activation_function", "gelu_new", _GPT2_ACTS,
                    "GPT-2-style MLPs use the tanh-approximated GELU")
        _hf_require(hf_config, "scale_attn_weights", True, (True,),
                    "attention logits are scaled by head_dim ** -0.5")
        _hf_require(hf_config, "scale_attn_by_inverse_layer_idx", False, (False,),
                    "attention logits are not scaled by the layer index")
        _hf_require(hf_config, "add_cross_attention", False, (False,),
                    "a decoder-only model has no cross-attention")
        width, heads = _hf(hf_config, "n_embd"), _hf(hf_config, "n_head")
        cfg = dict(name="lm", style="gpt2", vocab_size=_hf(hf_config, "vocab_size"),
                   width=width, depth=_hf(hf_config, "n_layer"), num_heads=heads,
                   num_kv_heads=heads, mlp_dim=_hf(hf_config, "n_inner", 4 * width),
                   max_length=_hf(hf_config, "n_positions"),
                   norm_eps=float(_hf(hf_config, "layer_norm_epsilon", 1e-5)),
                   tie_embeddings=bool(hf_config.get("tie_word_embeddings", True)))
    else:
        raise ConvertError(f"config.json model_type={model_type!r}: only Hugging Face "
                           f"{HF_LM_TYPES} causal language models are supported.")
    cfg.update(bos_id=_hf_token_id(hf_config, "bos_token_id"),
               eos_id=_hf_token_id(hf_config, "eos_token_id"))
    pad = _hf_token_id(hf_config, "pad_token_id")
    if pad is not None:
        cfg["pad_id"] = pad
    return cfg


def _hf_with_prefix(sd: Mapping[str, Any], prefix: str, marker: str) -> dict[str, Any]:
    """Adds ``prefix`` when the state dict is of the bare trunk (``LlamaModel``, ``GPT2Model``:
    ``embed_tokens.weight`` rather than ``model.embed_tokens.weight``)."""
    if marker in sd and prefix + marker not in sd:
        return {(k if k == "lm_head.weight" else prefix + k): v for k, v in sd.items()}
    return dict(sd)


def _hf_lm_head(out, sd, cfg, embedding_key):
    if not cfg["tie_embeddings"]:
        out["lm_head.kernel"] = sd["lm_head.weight"].T
    elif "lm_head.weight" in sd:  # Tied, yet saved as well: must be the embedding.
        head, emb = sd["lm_head.weight"], sd[embedding_key]
        if isinstance(head, np.ndarray) and not np.array_equal(head, emb):
            raise ConvertError(f"lm_head.weight differs from {embedding_key} although "
                               "config.json has tie_word_embeddings=true.")


def convert_hf_lm_state_dict(sd: Mapping[str, Any], model_config: Mapping) -> dict[str, Any]:
    """``LlamaForCausalLM`` / ``GPT2LMHeadModel`` keys -> flat :class:`~vlm_jax.models.lm.
    LanguageModel` parameter paths (``blocks.0.attn.query.kernel``...). torch ``Linear``
    weights ``[out, in]`` are transposed; GPT-2's ``Conv1D`` weights are already ``[in, out]``
    and its fused ``c_attn`` is split into query / key / value.

    Raises ConvertError naming a missing key, or any key left unused (biases LLaMA-style
    attention does not have...); only recomputed buffers (``rotary_emb.inv_freq``, GPT-2's
    ``attn.bias`` mask) may be left.
    """
    cfg = model_config
    d, h = cfg["width"], cfg["num_heads"]
    kvh, hd = cfg.get("num_kv_heads") or h, cfg.get("head_dim") or d // h
    out: dict[str, Any] = {}
    if cfg["style"] == "llama":
        sd = _Tracked(_hf_with_prefix(sd, "model.", "embed_tokens.weight"))
        out["token_embed.embedding"] = sd["model.embed_tokens.weight"]
        out["final_norm.scale"] = sd["model.norm.weight"]
        for i in range(cfg["depth"]):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            out[dst + "norm1.scale"] = sd[src + "input_layernorm.weight"]
            out[dst + "norm2.scale"] = sd[src + "post_attention_layernorm.weight"]
            for ours, theirs, n in (("query", "q_proj", h), ("key", "k_proj", kvh),
                                    ("value", "v_proj", kvh)):
                w = sd[f"{src}self_attn.{theirs}.weight"]
                out[f"{dst}attn.{ours}.kernel"] = w.T.reshape(w.shape[1], n, hd)
            w = sd[src + "self_attn.o_proj.weight"]
            out[dst + "attn.out.kernel"] = w.T.reshape(h, hd, w.shape[0])
            for ours in ("gate", "up", "down"):
                out[f"{dst}mlp.{ours}.kernel"] = sd[f"{src}mlp.{ours}_proj.weight"].T
        _hf_lm_head(out, sd, cfg, "model.embed_tokens.weight")
    elif cfg["style"] == "gpt2":
        sd = _Tracked(_hf_with_prefix(sd, "transformer.", "wte.weight"))
        out["token_embed.embedding"] = sd["transformer.wte.weight"]
        out["pos_embed"] = sd["transformer.wpe.weight"]
        _ln(out, "final_norm", sd, "transformer.ln_f")
        for i in range(cfg["depth"]):
            src, dst = f"transformer.h.{i}.", f"blocks.{i}."
            _ln(out, dst + "norm1", sd, src + "ln_1")
            _ln(out, dst + "norm2", sd, src + "ln_2")
            w, b = sd[src + "attn.c_attn.weight"], sd[src + "attn.c_attn.bias"]
            for j, name in enumerate(("query", "key", "value")):
                out[f"{dst}attn.{name}.kernel"] = w[:, j * d:(j + 1) * d].reshape(d, h, hd)
                out[f"{dst}attn.{name}.bias"] = b[j * d:(j + 1) * d].reshape(h, hd)
            out[dst + "attn.out.kernel"] = sd[src + "attn.c_proj.weight"].reshape(h, hd, d)
            out[dst + "attn.out.bias"] = sd[src + "attn.c_proj.bias"]
            for ours, theirs in (("up", "c_fc"), ("down", "c_proj")):
                out[f"{dst}mlp.{ours}.kernel"] = sd[f"{src}mlp.{theirs}.weight"]
                out[f"{dst}mlp.{ours}.bias"] = sd[f"{src}mlp.{theirs}.bias"]
        _hf_lm_head(out, sd, cfg, "transformer.wte.weight")
    else:
        raise ConvertError(f"style={cfg['style']!r}: use one of {HF_LM_TYPES}.")
    unused = sorted(k for k in set(sd) - sd.used if not _HF_BUFFERS.search(k))
    if unused:
        raise ConvertError(
            f"{len(unused)} weights have no counterpart in vlm_jax's {cfg['style']} language "
            f"model (e.g. {unused[:4]}): more layers than config.json says, biases, or another "
            "architecture.")
    return out


def convert_hf_lm(source: str | pathlib.Path | Mapping[str, Any],
                  hf_config: Mapping | None = None, *, scan_layers: bool = False
                  ) -> tuple[dict, dict]:
    """Imports a Hugging Face ``LlamaForCausalLM`` or ``GPT2LMHeadModel``.

    Args:
      source: a model directory (``config.json`` + ``model.safetensors``, see
        :func:`load_hf_lm`), a state dict file, or a state dict ``{key: numpy array}``.
      hf_config: the ``config.json`` contents; read from the directory when omitted.
      scan_layers: lay the layers out stacked (``blocks.attn.query.kernel [depth, ...]``) for a
        model with ``scan_layers=True``.

    Returns:
      ``(params, model_config)``: the :class:`~vlm_jax.models.lm.LanguageModel` parameters as
      ``nnx.state(model).to_pure_dict()`` lays them out (float32), and its model config
      (``name='lm'``, the ``lm`` family's, :mod:`vlm_jax.families`).
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

    if isinstance(source, Mapping):
        sd = source
    elif is_hf_lm(source):
        sd, read_config = load_hf_lm(source)
        hf_config = read_config if hf_config is None else hf_config
    else:
        sd = load_state_dict(source)
    if hf_config is None:
        raise ConvertError("Pass the model's config.json contents (hf_config) with a state "
                           "dict, or a model directory that holds config.json.")
    model_cfg = hf_lm_config(hf_config)
    if scan_layers:
        model_cfg["scan_layers"] = True
    flat = convert_hf_lm_state_dict(sd, model_cfg)
    build = get_family(model_cfg).build_model
    abstract = nnx.state(nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0))), nnx.Param)
    return to_model_params(flat, abstract).to_pure_dict(), model_cfg


# -------------------------------------------------------------------------------------------
# open_clip model folders (open_clip_config.json, as open_clip.push_to_hf_hub writes them).
# -------------------------------------------------------------------------------------------

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
RESIZE_MODES = ("shortest", "squash")  # input_pipeline.transforms.RESIZE_MODES; no letterboxing.
# Settings of open_clip_config.json that change the arithmetic without showing in the weights,
# and the values the converted model reproduces: (section, key) -> allowed values (a missing
# key is open_clip's default, which is the first of them).
_OPEN_CLIP_FIXED = {
    ("vision_cfg", "pool_type"): ("tok", "avg"),  # vlm_jax's ViT pool_type of the same name
    ("vision_cfg", "final_ln_after_pool"): (False,),
    ("vision_cfg", "act_kwargs"): ({},),
    ("vision_cfg", "norm_kwargs"): ({}, {"eps": 1e-5}),
    ("text_cfg", "pool_type"): ("argmax",),
    ("text_cfg", "no_causal_mask"): (False,),
    ("text_cfg", "act_kwargs"): ({},),
    ("text_cfg", "norm_kwargs"): ({}, {"eps": 1e-5}),
    ("text_cfg", "hf_tokenizer_name"): ("",),
    ("text_cfg", "tokenizer_kwargs"): ({},),
}


def open_clip_folder(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path] | None:
    """``(weights file, open_clip_config.json)`` of an open_clip model folder (as on the Hugging
    Face hub: ``open_clip_config.json`` + ``open_clip_model.safetensors`` or
    ``open_clip_pytorch_model.bin``), or of a weights file with that config beside it; None
    when there is no ``open_clip_config.json``."""
    path = pathlib.Path(path)
    folder = path if path.is_dir() else path.parent
    config = folder / OPEN_CLIP_CONFIG
    if not config.exists():
        return None
    if not path.is_dir():
        return path, config
    for name in OPEN_CLIP_WEIGHTS:
        if (folder / name).exists():
            return folder / name, config
    raise ConvertError(f"{folder} has {OPEN_CLIP_CONFIG} but none of {OPEN_CLIP_WEIGHTS}; "
                       "download the weights into the folder or pass the weights file.")


def open_clip_settings(oc_config: Mapping, where: str = OPEN_CLIP_CONFIG) -> dict:
    """What ``open_clip_config.json`` says that the weights do not: ``act``, ``image_size``,
    ``pixel_mean`` / ``pixel_std`` and ``resize_mode`` of the evaluation transform.

    Raises ConvertError naming a setting the converted model would not reproduce (average
    pooling, another tokenizer, letterbox resizing...), rather than converting it wrong.
    """
    model_cfg = oc_config.get("model_cfg", oc_config)
    pre = dict(oc_config.get("preprocess_cfg") or {})
    for (section, key), allowed in _OPEN_CLIP_FIXED.items():
        value = (model_cfg.get(section) or {}).get(key)
        if value is not None and value not in allowed:
            raise ConvertError(f"{where}: model_cfg.{section}.{key}={value!r} is not supported "
                               f"(vlm_jax's CLIP reproduces {allowed[0]!r}).")
    if (model_cfg.get("vision_cfg") or {}).get("timm_model_name") or \
            (model_cfg.get("text_cfg") or {}).get("hf_model_name"):
        raise ConvertError(f"{where}: timm or Hugging Face towers are not supported.")
    mode = pre.get("resize_mode", "shortest")
    if mode not in RESIZE_MODES:
        raise ConvertError(f"{where}: preprocess_cfg.resize_mode={mode!r} is not supported; "
                           f"use one of {RESIZE_MODES}.")
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation != "bicubic":
        raise ConvertError(f"{where}: preprocess_cfg.interpolation={interpolation!r} is not "
                           "supported (the evaluation transform resizes bicubic).")
    out = dict(act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", resize_mode=mode,
               pool_type=(model_cfg.get("vision_cfg") or {}).get("pool_type") or "tok")
    size = (model_cfg.get("vision_cfg") or {}).get("image_size")
    if size is not None:
        out["image_size"] = size
    for key, ours in (("mean", "pixel_mean"), ("std", "pixel_std")):
        if pre.get(key) is not None:
            value = [float(v) for v in pre[key]]
            if len(value) != 3:
                raise ConvertError(f"{where}: preprocess_cfg.{key}={pre[key]!r}: expected 3 "
                                   "per-channel values.")
            out[ours] = value
    return out


def _apply_open_clip_settings(model_cfg: dict, settings: Mapping, where: str) -> None:
    """Checks the image size against the weights'; writes the pixel statistics and the pooling
    into the image tower's config."""
    model_cfg["image"]["pool_type"] = settings.get("pool_type", "tok")
    size = settings.get("image_size")
    if size is not None:
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        got = model_cfg["image"]["image_size"]
        if size != (got, got):
            raise ConvertError(f"{where}: vision_cfg.image_size={settings['image_size']} but the "
                               f"weights' position embeddings are of {got} px images.")
    for key in ("pixel_mean", "pixel_std"):
        if key in settings:
            model_cfg["image"][key] = list(settings[key])


# -------------------------------------------------------------------------------------------
# The command.
# -------------------------------------------------------------------------------------------


def convert(input_path: str, workdir: str, *, act: str | None = None,
            base_config=None, dtype: str | None = "float32") -> pathlib.Path:
    """Converts ``input_path`` into ``workdir`` (``checkpoints/0`` + ``config.json``).

    ``input_path``: an open_clip model folder (``open_clip_config.json`` + weights, as on the
    Hugging Face hub: activation, image size and preprocessing are read from the config), a
    CLIP / CoCa state dict file (``act`` required unless ``open_clip_config.json`` is beside
    it), or a Hugging Face LLaMA / GPT-2 model directory (``config.json`` +
    ``model.safetensors``; no ``act``: the activation is in its config). ``base_config``: the
    run config whose data/eval/optimizer settings the workdir gets (default
    ``experiments/clip_openai.py``); its ``model`` is replaced by the inferred one, keeping its
    ``scan_layers`` and ``remat`` (``remat`` for a language model). ``dtype``: the compute dtype
    the workdir's model runs in (``model.dtype``): float32 by default, so that embeddings match
    the original's; ``'bfloat16'`` to fine-tune or evaluate at scale; None keeps the base
    config's. Refuses a workdir that already holds checkpoints.
    """
    from vlm_jax import paths  # pylint: disable=import-outside-toplevel

    if paths.is_remote(input_path):  # gs://: the readers below need a local file.
        problem = paths.remote_problem(input_path)
        if problem:
            raise ConvertError(problem)
        if not epath.Path(input_path).exists():
            raise ConvertError(f"--input {input_path} does not exist.")
        with paths.local_copy(input_path) as local:
            return _convert(local, workdir, act=act, base_config=base_config,
                            name=epath.Path(input_path).name, dtype=dtype)
    return _convert(input_path, workdir, act=act, base_config=base_config, dtype=dtype)


def _convert(input_path: str, workdir: str, *, act: str | None, base_config,
             name: str | None = None, dtype: str | None = "float32") -> pathlib.Path:
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel
    from vlm_jax.models import count_params  # pylint: disable=import-outside-toplevel

    if base_config is None:
        base_config = config_lib.load_config(
            str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "clip_openai.py"))
    config = base_config
    base_model = dict(config.get("model", {}))
    if dtype is not None:  # How to run it: the argument's choice, else the base config's.
        base_model["dtype"] = dtype
    from vlm_jax import interop_hf  # pylint: disable=import-outside-toplevel

    if interop_hf.hf_model_type(input_path):  # config.json model_type clip / siglip / siglip2
        if act is not None:
            raise ConvertError(f"--act {act!r} is for CLIP state dicts; {input_path} is a "
                               "Hugging Face model directory, whose activation is in its "
                               "config.json: leave --act out.")
        return interop_hf.convert_to_workdir(input_path, workdir, config, name=name,
                                             dtype=dtype)
    settings, oc = None, open_clip_folder(input_path)
    if oc is not None:  # open_clip_config.json: what the weights do not say.
        input_path, oc_path = oc
        settings = open_clip_settings(json.loads(oc_path.read_text()), str(oc_path))
        if act is not None and act != settings["act"]:
            raise ConvertError(f"--act {act} contradicts {oc_path} (quick_gelu="
                               f"{settings['act'] == 'quick_gelu'}): leave --act out.")
        act = settings["act"]
    if is_hf_lm(input_path):
        if act is not None:
            raise ConvertError(f"--act {act!r} is for CLIP state dicts; {input_path} is a "
                               "Hugging Face model directory, whose activation is in its "
                               "config.json: leave --act out.")
        params, model_cfg = convert_hf_lm(
            input_path, scan_layers=bool(base_model.get("scan_layers", False)))
        for key in ("dtype", "remat"):  # How to run it: --dtype, else the base config's choice.
            if key in base_model:
                model_cfg[key] = base_model[key]
        what = (f"{model_cfg['style']} {model_cfg['width']}x{model_cfg['depth']}, "
                f"{model_cfg['num_heads']} heads / {model_cfg['num_kv_heads']} key-value heads, "
                f"vocab {model_cfg['vocab_size']}")
    else:
        if act is None:
            raise ConvertError(f"{input_path} is a CLIP state dict without "
                               f"{OPEN_CLIP_CONFIG} beside it: pass --act ({ACTIVATIONS}: "
                               "quick_gelu for OpenAI's models and open_clip's *-quickgelu ones, "
                               "gelu for the others).")
        sd = load_state_dict(input_path)
        coca = is_coca(sd)
        model_cfg = infer_coca_config(sd, act=act) if coca else infer_model_config(sd, act=act)
        if settings is not None:
            _apply_open_clip_settings(model_cfg, settings, str(oc_path))
        for key in ("dtype", "scan_layers", "remat"):  # --dtype, else the base config's choice.
            if key in base_model:
                model_cfg[key] = base_model[key]
        build = get_family(model_cfg).build_model
        abstract = nnx.state(nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0))), nnx.Param)
        # The train state's layout: plain nested dicts of arrays (nnx.State.to_pure_dict()).
        flat = (convert_coca_state_dict if coca else convert_state_dict)(sd, model_cfg)
        params = to_model_params(flat, abstract).to_pure_dict()
        img, txt = model_cfg["image"], model_cfg["text"]
        what = (f"image {img['width']}x{img['depth']} patch {img['patch_size']} at "
                f"{img['image_size']} px, text {txt['width']}x{txt['depth']}, act {act}")
    with config.unlocked():
        config.model = model_cfg
        config.name = f"converted:{name or pathlib.Path(input_path).name}"
        if settings is not None:
            config.eval.resize_mode = settings["resize_mode"]
    workdir = write_workdir(workdir, params, config)
    n = count_params(params)
    print(f"Converted {input_path} ({n / 1e6:.1f}M parameters; {what}) into {workdir}.")
    return workdir
