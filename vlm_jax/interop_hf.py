"""Import Hugging Face ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` folders.

    vlm-jax convert --input openai-clip-vit-base-patch32/ --workdir runs/hf_b32
    vlm-jax convert --input siglip-base-patch16-224/ --workdir runs/siglip_b16

A folder as ``save_pretrained`` writes it (``config.json`` + ``model.safetensors`` + the
tokenizer files) becomes a :class:`vlm_jax.models.clip.CLIP` workdir. The architecture is read
from ``config.json`` (``model_type`` ``clip`` / ``siglip`` / ``siglip2``), every weight must be
mapped, and the arithmetic is the transformers classes' (``tests/test_hf_clip_import.py``
checks the embeddings against them within 1e-4):

* ``CLIPModel``: class token, ``pre_layrnorm``, causal text tower pooled at the first
  ``eos_token_id`` (at the largest id for the legacy ``eos_token_id=2`` configs, as
  transformers does), bias-free projections, ``logit_scale``.
* ``SiglipModel`` (SigLIP, and SigLIP 2's fixed-resolution checkpoints, which transformers ships
  as ``siglip``): patch bias, no class token or ``ln_pre``, MAP-head pooling
  (``vision_model.head``: a probe attending to the tokens, then ``x + mlp(norm(x))``), no image
  projection (``project_image=False``); text without causal mask, pooled at the last position,
  then a biased ``head`` (``text_projection_bias=True``); learned ``logit_scale`` and
  ``logit_bias``. Texts are padded to the full length and attend to the padding, as SigLIP was
  trained (transformers' ``padding='max_length'`` without an attention mask).
* ``Siglip2Model`` (NaFlex): imported at its native grid (``num_patches`` = g * g patches, a
  fixed ``g * patch_size`` px image); its linear patch embedding on ``(row, column, channel)``
  patches is the convolution kernel reshaped. Variable resolutions and aspect ratios (resized
  position embeddings, padded patch sequences) are not covered.

The tokenizer comes with the model: ``merges.txt`` + ``vocab.json`` (CLIP), ``spiece.model``
(SigLIP: lower-cased, punctuation removed, eos appended, padded with eos) or
``tokenizer.model`` (SigLIP 2's Gemma sentencepiece model; lower-casing and framing read from
``tokenizer.json``). They are copied into ``<workdir>/tokenizer/`` with a
``tokenizer_spec.json`` that ``config.data.tokenizer`` names
(:class:`input_pipeline.tokenizers.HfTextTokenizer`). Pixel statistics come from
``preprocessor_config.json`` (default CLIP's, or 0.5 for SigLIP).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from vlm_jax.weights import (ConvertError, _Tracked, _hf, _ln, load_hf_lm, to_model_params,
                             write_workdir)

HF_CLIP_TYPES = ("clip", "siglip", "siglip2")
# transformers' hidden_act names -> vlm_jax activations.
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
         "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
SIGLIP_PIXEL_STATS = (0.5, 0.5, 0.5)


def hf_model_type(path: str | pathlib.Path) -> str | None:
    """``config.json``'s ``model_type`` when ``path`` is a Hugging Face CLIP / SigLIP /
    SigLIP 2 folder, else None."""
    config = pathlib.Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError):
        return None
    return model_type if model_type in HF_CLIP_TYPES else None


def _act(tower: Mapping, where: str, default: str) -> str:
    name = tower.get("hidden_act", default)
    if name not in _ACTS:
        raise ConvertError(f"config.json {where}.hidden_act={name!r} is not supported; use one of "
                           f"{sorted(_ACTS)}.")
    return _ACTS[name]


def hf_clip_config(hf_config: Mapping, preprocessor: Mapping | None = None) -> dict:
    """The ``vlm_jax`` CLIP model config (``name='clip'``) of a transformers ``config.json``
    of ``model_type`` ``clip`` / ``siglip`` / ``siglip2`` (``preprocessor``: the folder's
    ``preprocessor_config.json``, for the pixel statistics)."""
    model_type = hf_config.get("model_type")
    if model_type not in HF_CLIP_TYPES:
        raise ConvertError(f"config.json model_type={model_type!r}: use one of {HF_CLIP_TYPES}.")
    v, t = hf_config.get("vision_config") or {}, hf_config.get("text_config") or {}
    siglip = model_type != "clip"
    default_act = "gelu_pytorch_tanh" if siglip else "quick_gelu"
    eps_default = 1e-6 if siglip else 1e-5
    width, patch = _hf(v, "hidden_size", 768), _hf(v, "patch_size", 16 if siglip else 32)
    if model_type == "siglip2":
        num_patches = _hf(v, "num_patches", 256)
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ConvertError(f"config.json vision_config.num_patches={num_patches} is not a "
                               "square grid: only the native square grid is imported.")
        image_size = grid * patch
    else:
        image_size = _hf(v, "image_size", 224)
    if siglip and not v.get("vision_use_head", True):
        raise ConvertError("config.json vision_config.vision_use_head=false: a SigLIP vision "
                           "tower without its MAP head is not a dual encoder to import.")
    image = dict(width=width, depth=_hf(v, "num_hidden_layers", 12),
                 num_heads=_hf(v, "num_attention_heads", 12),
                 mlp_dim=_hf(v, "intermediate_size", 3072), patch_size=patch,
                 image_size=image_size, pool_type="map" if siglip else "tok",
                 pre_norm=not siglip, patch_bias=siglip,
                 act=_act(v, "vision_config", default_act),
                 ln_eps=float(v.get("layer_norm_eps", eps_default)))
    mean = (preprocessor or {}).get("image_mean")
    std = (preprocessor or {}).get("image_std")
    if siglip:
        mean, std = mean or SIGLIP_PIXEL_STATS, std or SIGLIP_PIXEL_STATS
    if mean is not None or std is not None:
        image.update(pixel_mean=[float(x) for x in mean or (0.48145466, 0.4578275, 0.40821073)],
                     pixel_std=[float(x) for x in std or (0.26862954, 0.26130258, 0.27577711)])
    tw = _hf(t, "hidden_size", 512)
    vocab = _hf(t, "vocab_size", 49408)
    text = dict(width=tw, depth=_hf(t, "num_hidden_layers", 12),
                num_heads=_hf(t, "num_attention_heads", 8),
                mlp_dim=_hf(t, "intermediate_size", 2048), vocab_size=vocab,
                context_length=_hf(t, "max_position_embeddings", 64 if siglip else 77),
                act=_act(t, "text_config", default_act),
                ln_eps=float(t.get("layer_norm_eps", eps_default)))
    cfg = dict(name="clip", image=image, text=text, dtype="float32", remat="none",
               scan_layers=False, logit_scale_init=math.log(1 / 0.07),
               logit_scale_max=math.log(100.0))
    if siglip:
        text.update(pool_type="last", causal=False)
        proj = _hf(t, "projection_size", tw)
        if proj != width:
            raise ConvertError(f"config.json text_config.projection_size={proj} differs from "
                               f"vision_config.hidden_size={width}: the embeddings would not "
                               "match.")
        cfg.update(embed_dim=width, project_image=False, text_projection_bias=True,
                   logit_scale_init=math.log(10.0), logit_bias_init=-10.0)
    else:
        eos = _hf(t, "eos_token_id", 49407)
        # transformers pools legacy configs (eos_token_id=2) at the largest id, which is the
        # end-of-text token of CLIP's vocabulary (its last id).
        text.update(pool_type="eos", causal=True, eos_id=vocab - 1 if eos == 2 else int(eos))
        cfg.update(embed_dim=_hf(hf_config, "projection_dim", 512))
    return cfg


def _hf_attn(out, dst, sd, src, heads):
    """transformers ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` (weights ``[out, in]``)
    -> query / key / value / out kernels."""
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        w = sd[f"{src}{theirs}.weight"]
        d = w.shape[0]
        out[f"{dst}{ours}.kernel"] = w.T.reshape(w.shape[1], heads, d // heads)
        out[f"{dst}{ours}.bias"] = sd[f"{src}{theirs}.bias"].reshape(heads, d // heads)
    w = sd[f"{src}out_proj.weight"]
    out[f"{dst}out.kernel"] = w.T.reshape(heads, w.shape[1] // heads, w.shape[0])
    out[f"{dst}out.bias"] = sd[f"{src}out_proj.bias"]


def _linear(out, dst, sd, src, bias=True):
    out[dst + ".kernel"] = sd[src + ".weight"].T
    if bias:
        out[dst + ".bias"] = sd[src + ".bias"]


def _hf_layers(out, dst, sd, src, depth, heads):
    for i in range(depth):
        s, d = f"{src}.encoder.layers.{i}.", f"{dst}.encoder.blocks.{i}."
        _hf_attn(out, d + "attn.", sd, s + "self_attn.", heads)
        _ln(out, d + "norm1", sd, s + "layer_norm1")
        _ln(out, d + "norm2", sd, s + "layer_norm2")
        _linear(out, d + "mlp.fc1", sd, s + "mlp.fc1")
        _linear(out, d + "mlp.fc2", sd, s + "mlp.fc2")


def convert_hf_clip_state_dict(sd: Mapping[str, Any], model_config: Mapping,
                               model_type: str) -> dict[str, Any]:
    """transformers ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` keys -> flat ``vlm_jax``
    CLIP parameter paths (``image.encoder.blocks.0.attn.query.kernel``...). Raises
    ConvertError naming a missing key or any key left unused."""
    sd = _Tracked(sd)
    img, txt = model_config["image"], model_config["text"]
    out: dict[str, Any] = {}
    v, t = "vision_model", "text_model"
    w = sd[f"{v}.embeddings.patch_embedding.weight"]
    p = img["patch_size"]
    if w.ndim == 2:  # Siglip2: Linear on (row, column, channel)-flattened patches.
        out["image.patch_embed.kernel"] = w.T.reshape(p, p, 3, w.shape[0])
    else:  # Conv2d [out, in, kh, kw].
        out["image.patch_embed.kernel"] = w.transpose(2, 3, 1, 0)
    out["image.pos_embed"] = sd[f"{v}.embeddings.position_embedding.weight"]
    _ln(out, "image.final_norm", sd, f"{v}.post_layernorm")
    _hf_layers(out, "image", sd, v, img["depth"], img["num_heads"])
    out["text.token_embed.embedding"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["text.pos_embed"] = sd[f"{t}.embeddings.position_embedding.weight"]
    _ln(out, "text.final_norm", sd, f"{t}.final_layer_norm")
    _hf_layers(out, "text", sd, t, txt["depth"], txt["num_heads"])
    out["logit_scale"] = sd["logit_scale"].reshape(())
    if model_type == "clip":
        out["image.cls_token"] = sd[f"{v}.embeddings.class_embedding"]
        _ln(out, "image.pre_norm", sd, f"{v}.pre_layrnorm")
        _linear(out, "image_projection", sd, "visual_projection", bias=False)
        _linear(out, "text_projection", sd, "text_projection", bias=False)
    else:
        out["image.patch_embed.bias"] = sd[f"{v}.embeddings.patch_embedding.bias"]
        h = f"{v}.head."
        out["image.map_head.probe"] = sd[h + "probe"]
        # torch nn.MultiheadAttention: the fused in_proj splits into query / key / value.
        wq, bq = sd[h + "attention.in_proj_weight"], sd[h + "attention.in_proj_bias"]
        d, heads = wq.shape[1], img["num_heads"]
        for i, name in enumerate(("query", "key", "value")):
            out[f"image.map_head.attn.{name}.kernel"] = (
                wq[i * d:(i + 1) * d].T.reshape(d, heads, d // heads))
            out[f"image.map_head.attn.{name}.bias"] = bq[i * d:(i + 1) * d].reshape(heads, -1)
        wo = sd[h + "attention.out_proj.weight"]
        out["image.map_head.attn.out.kernel"] = wo.T.reshape(heads, d // heads, d)
        out["image.map_head.attn.out.bias"] = sd[h + "attention.out_proj.bias"]
        _ln(out, "image.map_head.norm", sd, h + "layernorm")
        _linear(out, "image.map_head.mlp.fc1", sd, h + "mlp.fc1")
        _linear(out, "image.map_head.mlp.fc2", sd, h + "mlp.fc2")
        _linear(out, "text_projection", sd, f"{t}.head")
        out["logit_bias"] = sd["logit_bias"].reshape(())
    # Buffers transformers may save: position ids, recomputed here.
    unused = sorted(k for k in set(sd) - sd.used if not k.endswith("position_ids"))
    if unused:
        raise ConvertError(
            f"{len(unused)} weights have no counterpart in vlm_jax's CLIP (e.g. {unused[:4]}): "
            "more layers than config.json says, or another architecture.")
    return out


# -------------------------------------------------------------------------------------------
# Tokenizer.
# -------------------------------------------------------------------------------------------


def _tokenizer_json(d: pathlib.Path) -> dict:
    f = d / "tokenizer.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _special_id(vocab: Mapping[str, int], token: Any) -> int | None:
    if isinstance(token, Mapping):  # {"content": "</s>", ...} in older tokenizer configs.
        token = token.get("content")
    return None if token is None else vocab.get(str(token))


def hf_tokenizer_spec(directory: str | pathlib.Path, model_type: str,
                      context_length: int) -> tuple[dict, pathlib.Path]:
    """``(spec, vocabulary file)`` of a model folder's tokenizer: the
    :class:`~input_pipeline.tokenizers.HfTextTokenizer` spec reproducing the transformers
    tokenizer's ids, and the file it reads. Raises ConvertError naming the missing file."""
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel

    d = pathlib.Path(directory)
    tconf_path = d / "tokenizer_config.json"
    tconf = json.loads(tconf_path.read_text()) if tconf_path.exists() else {}
    tjson = _tokenizer_json(d)
    spec: dict[str, Any] = dict(context_length=context_length)
    if model_type == "clip":
        if not (d / "merges.txt").exists() or not (d / "vocab.json").exists():
            raise ConvertError(f"{d} has no merges.txt + vocab.json: the CLIP tokenizer files "
                               "(as CLIPTokenizer.save_pretrained writes them).")
        vocab = json.loads((d / "vocab.json").read_text())
        from input_pipeline.tokenizers import \
            ClipBpeTokenizer  # pylint: disable=import-outside-toplevel
        ours = ClipBpeTokenizer(d / "merges.txt", context_length, max_merges=10**9).encoder
        if ours != vocab:
            raise ConvertError(f"{d / 'vocab.json'} is not the vocabulary that merges.txt "
                               "implies (bytes, bytes</w>, merges, <|startoftext|>, "
                               "<|endoftext|>): another BPE layout.")
        spec.update(kind="clip_bpe", model="merges.txt",
                    bos_id=_special_id(vocab, tconf.get("bos_token", "<|startoftext|>")),
                    eos_id=_special_id(vocab, tconf.get("eos_token", "<|endoftext|>")),
                    pad_id=_special_id(vocab, tconf.get("pad_token", "<|endoftext|>")),
                    padding_side=tconf.get("padding_side", "right"))
        return spec, d / "merges.txt"
    name = "spiece.model" if model_type == "siglip" else "tokenizer.model"
    model = d / name
    if not model.exists():
        other = d / ("tokenizer.model" if name == "spiece.model" else "spiece.model")
        if not other.exists():
            raise ConvertError(f"{d} has no {name}: the sentencepiece model of the tokenizer "
                               "(vlm_jax reads it with sentencepiece, not tokenizer.json).")
        model, name = other, other.name
    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    for tok in tjson.get("added_tokens", []):
        vocab.setdefault(tok["content"], tok["id"])
    if model_type == "siglip" and tconf.get("tokenizer_class", "SiglipTokenizer") == \
            "SiglipTokenizer":
        # SiglipTokenizer: canonicalize_text, then pieces + eos, padded with pad_token (eos).
        spec.update(kind="sentencepiece", model=name,
                    lower=bool(tconf.get("do_lower_case", True)), strip_punctuation=True,
                    bos_id=None, eos_id=_special_id(vocab, tconf.get("eos_token", "</s>")),
                    pad_id=_special_id(vocab, tconf.get("pad_token", "</s>")),
                    padding_side=tconf.get("padding_side", "right"))
    else:
        # Gemma-style tokenizer.json: framing from the post-processor's template, lower-casing
        # from the normaliser (Siglip2Tokenizer adds Lowercase).
        normalizers = (tjson.get("normalizer") or {})
        steps = normalizers.get("normalizers", [normalizers])
        template = (tjson.get("post_processor") or {}).get("single")
        if template is None:
            raise ConvertError(f"{d}/tokenizer.json has no TemplateProcessing post-processor: "
                               "cannot tell which special tokens frame a text.")
        specials = [s["SpecialToken"]["id"] for s in template if "SpecialToken" in s]
        seq_at = next(i for i, s in enumerate(template) if "Sequence" in s)
        before = [s["SpecialToken"]["id"] for s in template[:seq_at] if "SpecialToken" in s]
        after = [s for s in specials if s not in before]
        if len(before) > 1 or len(after) > 1:
            raise ConvertError(f"{d}/tokenizer.json frames texts with {specials}: only one "
                               "token before and one after are supported.")
        # Siglip2Tokenizer / GemmaTokenizer pad on the left unless the config says otherwise.
        default_side = ("left" if tconf.get("tokenizer_class") in
                        ("Siglip2Tokenizer", "GemmaTokenizer", None) else "right")
        spec.update(kind="sentencepiece", model=name,
                    # Siglip2Tokenizer adds Lowercase when it loads, whatever the file says.
                    lower=any(s.get("type") == "Lowercase" for s in steps)
                    or tconf.get("tokenizer_class") == "Siglip2Tokenizer",
                    strip_punctuation=False,
                    bos_id=_special_id(vocab, before[0]) if before else None,
                    eos_id=_special_id(vocab, after[0]) if after else None,
                    pad_id=_special_id(vocab, tconf.get("pad_token", "<pad>")),
                    padding_side=tconf.get("padding_side", default_side))
    if spec["pad_id"] is None:
        raise ConvertError(f"{d}: the pad token {tconf.get('pad_token')!r} is not in the "
                           "vocabulary.")
    return spec, model


# -------------------------------------------------------------------------------------------
# Import.
# -------------------------------------------------------------------------------------------


def convert_hf_clip(directory: str | pathlib.Path, *, scan_layers: bool = False
                    ) -> tuple[dict, dict, str]:
    """Imports a transformers ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` folder.

    Returns ``(params, model_config, model_type)``: the :class:`~vlm_jax.models.clip.CLIP`
    parameters as ``nnx.state(model).to_pure_dict()`` lays them out (float32, layers stacked
    with ``scan_layers``), its model config and ``config.json``'s ``model_type``.
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

    d = pathlib.Path(directory)
    sd, hf_config = load_hf_lm(d)
    prep = d / "preprocessor_config.json"
    model_cfg = hf_clip_config(hf_config, json.loads(prep.read_text()) if prep.exists() else None)
    model_type = hf_config["model_type"]
    # Fine-tuning must not clamp an imported temperature below its value (SigLIP's exceed 100).
    scale = float(np.asarray(sd.get("logit_scale", 0.0)).reshape(()))
    model_cfg["logit_scale_max"] = max(model_cfg["logit_scale_max"], scale)
    if scan_layers:
        model_cfg["scan_layers"] = True
    flat = convert_hf_clip_state_dict(sd, model_cfg, model_type)
    build = get_family(model_cfg).build_model
    abstract = nnx.state(nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0))), nnx.Param)
    return to_model_params(flat, abstract).to_pure_dict(), model_cfg, model_type


def convert_to_workdir(input_dir: str | pathlib.Path, workdir: str, config, *,
                       name: str | None = None, dtype: str | None = "float32"):
    """``vlm-jax convert`` of a Hugging Face CLIP / SigLIP / SigLIP 2 folder: writes
    checkpoint 0 + ``config.json`` (``config`` with ``model`` replaced, keeping its ``dtype``,
    ``scan_layers`` and ``remat``; ``dtype``, default float32, overrides its dtype) and the
    tokenizer into ``workdir/tokenizer/``, which ``config.data.tokenizer`` names. Returns the
    workdir."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    from vlm_jax.models import count_params  # pylint: disable=import-outside-toplevel

    base_model = dict(config.get("model", {}))
    if dtype is not None:  # How to run it: the argument's choice, else the base config's.
        base_model["dtype"] = dtype
    params, model_cfg, model_type = convert_hf_clip(
        input_dir, scan_layers=bool(base_model.get("scan_layers", False)))
    for key in ("dtype", "remat"):  # How to run it: the base config's choice.
        if key in base_model:
            model_cfg[key] = base_model[key]
    spec, vocab_file = hf_tokenizer_spec(input_dir, model_type,
                                         model_cfg["text"]["context_length"])
    spec["vocab_size"] = model_cfg["text"]["vocab_size"]
    text_config = json.loads((pathlib.Path(input_dir) / "config.json").read_text()).get(
        "text_config") or {}
    # config.json's own special ids (transformers' generation settings), for the export back.
    spec["text_config_token_ids"] = {k: text_config[k] for k in (
        "bos_token_id", "eos_token_id", "pad_token_id") if text_config.get(k) is not None}
    tok_dir = epath.Path(workdir) / "tokenizer"
    if (epath.Path(workdir) / "checkpoints").exists() and any(
            (epath.Path(workdir) / "checkpoints").iterdir()):
        raise ConvertError(f"{workdir} already holds checkpoints; convert into a new --workdir.")
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):  # Kept for the export back to transformers.
        if (pathlib.Path(input_dir) / f).exists():
            (tok_dir / f).write_bytes((pathlib.Path(input_dir) / f).read_bytes())
    (tok_dir / vocab_file.name).write_bytes(vocab_file.read_bytes())
    (tok_dir / "tokenizer_spec.json").write_text(json.dumps(spec, indent=1))
    with config.unlocked():
        config.model = model_cfg
        config.name = f"converted:{name or pathlib.Path(input_dir).name}"
        if "data" in config:
            config.data.tokenizer = str(tok_dir / "tokenizer_spec.json")
    workdir = write_workdir(workdir, params, config)
    img, txt = model_cfg["image"], model_cfg["text"]
    print(f"Converted {input_dir} ({model_type}, {count_params(params) / 1e6:.1f}M parameters; "
          f"image {img['width']}x{img['depth']} patch {img['patch_size']} at "
          f"{img['image_size']} px, {img['pool_type']} pooling; text {txt['width']}x"
          f"{txt['depth']}, vocab {txt['vocab_size']}) into {workdir}.")
    return workdir
