"""Export a CLIP / SigLIP workdir to open_clip or transformers: ``vlm-jax export``.

    vlm-jax export --workdir runs/clip_b32 --format open_clip --output out/clip_b32
    python -c "import open_clip; open_clip.create_model('local-dir:out/clip_b32')"
    vlm-jax export --workdir runs/siglip --format hf --output out/siglip
    python -c "import transformers; transformers.AutoModel.from_pretrained('out/siglip')"

Reads the latest (or ``--step``) checkpoint's parameters and the workdir's ``config.json``, and
writes float32 safetensors with the config each library loads:

* ``open_clip``: ``open_clip_model.safetensors`` + ``open_clip_config.json`` (``model_cfg`` and
  ``preprocess_cfg``: what ``open_clip.create_model('local-dir:DIR')`` reads), in OpenAI's key
  layout (``visual.conv1.weight``, ``transformer.resblocks.N.attn.in_proj_weight``...). For
  CLIP-style models only (class-token pooling, ``ln_pre``, no patch bias, causal text pooled at
  its end-of-text token, exact or quick GELU, LayerNorm eps 1e-5; a ``logit_bias``, as
  ``siglip_tiny``'s, is kept): open_clip's own towers have no MAP head (its SigLIP models use
  timm towers).
* ``hf``: ``model.safetensors`` + ``config.json`` of a ``CLIPModel`` (CLIP-style models) or a
  ``SiglipModel`` (SigLIP-style: MAP pooling, no image projection, biased text head,
  ``logit_bias``); ``hf_model_type='siglip2'`` writes a ``Siglip2Model`` (NaFlex, at the
  model's grid) instead. The tokenizer files kept by an import (``<workdir>/tokenizer/``) are
  copied along.

Every parameter must be written: a model feature the target lacks raises ExportError naming it.
The mapping is the inverse of :mod:`vlm_jax.convert` / :mod:`vlm_jax.interop_hf`
(``tests/test_export.py``: import, export and compare is exact).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping

import numpy as np

FORMATS = ("open_clip", "hf")


class ExportError(ValueError):
    """A model that cannot be written in the asked format; the message names the feature."""


def flat_params(params: Mapping) -> dict[str, np.ndarray]:
    """A pure parameter dict (``nnx.state(model).to_pure_dict()``) as ``{dotted path: float32
    numpy array}``, layer-stacked (scanned) blocks split into ``blocks.0``, ``blocks.1``..."""
    out: dict[str, np.ndarray] = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = np.asarray(node, np.float32)

    walk("", params)
    unstacked = {}
    for key, value in out.items():
        m = re.search(r"(^|\.)blocks\.(?!\d)", key)
        if m is None:
            unstacked[key] = value
            continue
        head, tail = key[:m.end()], key[m.end():]
        for i in range(value.shape[0]):
            unstacked[f"{head}{i}.{tail}"] = value[i]
    return unstacked


def _get(p: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in p:
        raise ExportError(f"The model has no parameter {key!r}: not the layout this export "
                          "writes.")
    return p[key]


def _check(cond: bool, what: str, fmt: str) -> None:
    if not cond:
        raise ExportError(f"--format {fmt}: {what}.")


class _Used(dict):
    """Parameters, recording which were written (every one must be)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return _get(dict(self), key)

    def check_all_used(self, fmt: str) -> None:
        left = sorted(set(self) - self.used)
        if left:
            raise ExportError(f"--format {fmt}: {len(left)} parameters have no place in the "
                              f"exported model (e.g. {left[:4]}).")


def _tower(model_cfg: Mapping, name: str) -> dict:
    from vlm_jax.models.vit import resolve_dims  # pylint: disable=import-outside-toplevel

    cfg = dict(model_cfg[name])
    if name == "image":
        cfg.update(resolve_dims(cfg.get("variant"), **{k: cfg.get(k) for k in (
            "width", "depth", "mlp_dim", "num_heads", "patch_size")}))
        size = cfg.get("image_size", 224)
        if not isinstance(size, int):
            size = list(size)
            _check(size[0] == size[1], f"image_size {size} is not square", "open_clip / hf")
            size = size[0]
        cfg["image_size"] = int(size)
    return cfg


def _style(model_cfg: Mapping) -> str:
    """``'clip'`` or ``'siglip'``: the layout a CLIP-family model config has."""
    if model_cfg.get("name", "clip") not in ("clip", "siglip"):
        raise ExportError(f"model.name={model_cfg.get('name')!r}: only CLIP / SigLIP dual "
                          "encoders are exported (CoCa, LM and Flamingo are not).")
    img = _tower(model_cfg, "image")
    return "siglip" if img.get("pool_type", "tok") == "map" else "clip"


def _pixel_stats(img: Mapping) -> tuple[list, list]:
    from vlm_jax.models import layers  # pylint: disable=import-outside-toplevel

    return (list(img.get("pixel_mean") or layers.PIXEL_MEAN),
            list(img.get("pixel_std") or layers.PIXEL_STD))


def _common_clip_checks(model_cfg: Mapping, fmt: str, logit_bias: bool = False,
                        pools: tuple[str, ...] = ("tok",)) -> tuple[dict, dict]:
    img, txt = _tower(model_cfg, "image"), _tower(model_cfg, "text")
    _check(img.get("pool_type", "tok") in pools,
           "the image tower must pool at its class token"
           + (" or average its patch tokens with a class token (pool_type 'avg')"
              if "avg" in pools else " (pool_type 'tok'; transformers' CLIPVisionModel pools no "
              "other way, while --format open_clip holds pool_type 'avg' too)"), fmt)
    _check(img.get("pre_norm", True), "the image tower needs ln_pre (pre_norm=True)", fmt)
    _check(not img.get("patch_bias", False), "the patch embedding must have no bias", fmt)
    _check(not img.get("num_classes"), "no classification head", fmt)
    _check(txt.get("causal", True), "the text tower must be causal", fmt)
    _check(txt.get("pool_type", "eos") == "eos", "the text tower must pool at eos_id", fmt)
    _check(model_cfg.get("project_image", True) and not model_cfg.get("text_projection_bias"),
           "bias-free image and text projections", fmt)
    _check(logit_bias or model_cfg.get("logit_bias_init") is None,
           "no logit_bias (transformers' CLIPModel has none; --format open_clip keeps it)", fmt)
    _check(img.get("act", "gelu") == txt.get("act", "gelu") and
           img.get("act", "gelu") in ("gelu", "quick_gelu"),
           "both towers must use the same activation, gelu or quick_gelu", fmt)
    return img, txt


# -------------------------------------------------------------------------------------------
# open_clip.
# -------------------------------------------------------------------------------------------


def _oc_block(sd, p, src, dst):
    q, k, v = (p[f"{src}attn.{n}.kernel"] for n in ("query", "key", "value"))
    d = q.shape[0]
    sd[dst + "attn.in_proj_weight"] = np.concatenate([w.reshape(d, -1).T for w in (q, k, v)])
    sd[dst + "attn.in_proj_bias"] = np.concatenate(
        [p[f"{src}attn.{n}.bias"].reshape(-1) for n in ("query", "key", "value")])
    sd[dst + "attn.out_proj.weight"] = p[src + "attn.out.kernel"].reshape(-1, d).T
    sd[dst + "attn.out_proj.bias"] = p[src + "attn.out.bias"]
    for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
        sd[f"{dst}{theirs}.weight"] = p[f"{src}{ours}.scale"]
        sd[f"{dst}{theirs}.bias"] = p[f"{src}{ours}.bias"]
    for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
        sd[f"{dst}mlp.{theirs}.weight"] = p[f"{src}mlp.{ours}.kernel"].T
        sd[f"{dst}mlp.{theirs}.bias"] = p[f"{src}mlp.{ours}.bias"]


def to_open_clip(params: Mapping, model_cfg: Mapping) -> tuple[dict[str, np.ndarray], dict]:
    """``(state dict, open_clip_config.json contents)`` of a CLIP-style model."""
    fmt = "open_clip"
    if _style(model_cfg) != "clip":
        raise ExportError("--format open_clip: the image tower pools with a MAP head (SigLIP), "
                          "which open_clip's VisionTransformer does not have; use --format hf.")
    img, txt = _common_clip_checks(model_cfg, fmt, logit_bias=True, pools=("tok", "avg"))
    for tower in (img, txt):
        _check(float(tower.get("ln_eps", 1e-5)) == 1e-5, "LayerNorm eps 1e-5 (open_clip's)", fmt)
    _check(img["width"] % img["num_heads"] == 0, "image width divisible by its heads", fmt)
    p = _Used(flat_params(params))
    sd: dict[str, np.ndarray] = {
        "visual.conv1.weight": p["image.patch_embed.kernel"].transpose(3, 2, 0, 1),
        "visual.class_embedding": p["image.cls_token"],
        "visual.positional_embedding": p["image.pos_embed"],
        "visual.proj": p["image_projection.kernel"],
        "token_embedding.weight": p["text.token_embed.embedding"],
        "positional_embedding": p["text.pos_embed"],
        "text_projection": p["text_projection.kernel"],
        "logit_scale": p["logit_scale"].reshape(()),
    }
    for ours, theirs in (("image.pre_norm", "visual.ln_pre"),
                         ("image.final_norm", "visual.ln_post"), ("text.final_norm", "ln_final")):
        sd[theirs + ".weight"], sd[theirs + ".bias"] = p[ours + ".scale"], p[ours + ".bias"]
    if model_cfg.get("logit_bias_init") is not None:  # open_clip's CLIP(init_logit_bias=...)
        sd["logit_bias"] = p["logit_bias"].reshape(())
    for i in range(img["depth"]):
        _oc_block(sd, p, f"image.encoder.blocks.{i}.", f"visual.transformer.resblocks.{i}.")
    for i in range(txt["depth"]):
        _oc_block(sd, p, f"text.encoder.blocks.{i}.", f"transformer.resblocks.{i}.")
    p.check_all_used(fmt)
    vocab, eos = txt["vocab_size"], txt.get("eos_id")
    text_cfg = dict(context_length=txt["context_length"], vocab_size=vocab, width=txt["width"],
                    heads=txt["num_heads"], layers=txt["depth"],
                    mlp_ratio=txt["mlp_dim"] / txt["width"])
    if eos != vocab - 1:  # open_clip's default pools at the largest id; elsewhere name eos.
        text_cfg.update(pool_type="eos", eos_id=int(eos))
    mean, std = _pixel_stats(img)
    cfg = dict(model_cfg=dict(
        embed_dim=model_cfg["embed_dim"], quick_gelu=img.get("act") == "quick_gelu",
        vision_cfg=dict(image_size=img["image_size"], layers=img["depth"], width=img["width"],
                        patch_size=img["patch_size"],
                        head_width=img["width"] // img["num_heads"],
                        mlp_ratio=img["mlp_dim"] / img["width"],
                        pool_type=img.get("pool_type", "tok")),
        text_cfg=text_cfg), preprocess_cfg=dict(mean=mean, std=std))
    if "logit_bias" in sd:
        cfg["model_cfg"]["init_logit_bias"] = float(sd["logit_bias"])
    for tower, key in ((img, "vision_cfg"), (txt, "text_cfg")):
        ratio = cfg["model_cfg"][key]["mlp_ratio"]
        _check(int(tower["width"] * ratio) == tower["mlp_dim"],
               f"{key} mlp_dim {tower['mlp_dim']} = int(width * mlp_ratio)", fmt)
    return sd, cfg


# -------------------------------------------------------------------------------------------
# transformers.
# -------------------------------------------------------------------------------------------

_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _hf_layers(sd, p, src, dst, depth):
    for i in range(depth):
        s, d = f"{src}.encoder.blocks.{i}.", f"{dst}.encoder.layers.{i}."
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            w = p[f"{s}attn.{ours}.kernel"]
            sd[f"{d}self_attn.{theirs}.weight"] = w.reshape(w.shape[0], -1).T
            sd[f"{d}self_attn.{theirs}.bias"] = p[f"{s}attn.{ours}.bias"].reshape(-1)
        w = p[s + "attn.out.kernel"]
        sd[d + "self_attn.out_proj.weight"] = w.reshape(-1, w.shape[-1]).T
        sd[d + "self_attn.out_proj.bias"] = p[s + "attn.out.bias"]
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            sd[f"{d}{theirs}.weight"] = p[f"{s}{ours}.scale"]
            sd[f"{d}{theirs}.bias"] = p[f"{s}{ours}.bias"]
        for n in ("fc1", "fc2"):
            sd[f"{d}mlp.{n}.weight"] = p[f"{s}mlp.{n}.kernel"].T
            sd[f"{d}mlp.{n}.bias"] = p[f"{s}mlp.{n}.bias"]


def _hf_tower_cfg(tower: Mapping, fmt: str) -> dict:
    act = tower.get("act", "gelu")
    _check(act in _HF_ACTS, f"activation {act!r} (transformers: {sorted(_HF_ACTS)})", fmt)
    return dict(hidden_size=tower["width"], intermediate_size=tower["mlp_dim"],
                num_hidden_layers=tower["depth"], num_attention_heads=tower["num_heads"],
                # 1e-5: the CLIP model's default in both towers (models/clip.py, text.py).
                hidden_act=_HF_ACTS[act], layer_norm_eps=float(tower.get("ln_eps", 1e-5)))


def to_hf(params: Mapping, model_cfg: Mapping, hf_model_type: str | None = None,
          token_ids: Mapping[str, int | None] | None = None
          ) -> tuple[dict[str, np.ndarray], dict, dict]:
    """``(state dict, config.json contents, preprocessor_config.json contents)`` of a
    transformers ``CLIPModel`` (CLIP-style model), ``SiglipModel`` (SigLIP-style) or, with
    ``hf_model_type='siglip2'``, ``Siglip2Model``. ``token_ids``: the tokenizer's ``bos_id`` /
    ``eos_id`` / ``pad_id``, recorded in ``text_config`` (CLIP's eos is the model's own)."""
    fmt = "hf"
    style = _style(model_cfg)
    model_type = hf_model_type or style
    allowed = ("clip",) if style == "clip" else ("siglip", "siglip2")
    if model_type not in allowed:
        raise ExportError(f"--hf_model_type {model_type!r}: a {style}-style model exports as "
                          f"{allowed}.")
    p = _Used(flat_params(params))
    img, txt = _tower(model_cfg, "image"), _tower(model_cfg, "text")
    mean, std = _pixel_stats(img)
    vision_cfg = dict(_hf_tower_cfg(img, fmt), patch_size=img["patch_size"])
    text_cfg = dict(_hf_tower_cfg(txt, fmt), vocab_size=txt["vocab_size"],
                    max_position_embeddings=txt["context_length"])
    sd: dict[str, np.ndarray] = {}
    v, t = "vision_model", "text_model"
    kernel = p["image.patch_embed.kernel"]  # [p, p, 3, width]
    sd[f"{v}.embeddings.position_embedding.weight"] = p["image.pos_embed"]
    sd[f"{v}.post_layernorm.weight"] = p["image.final_norm.scale"]
    sd[f"{v}.post_layernorm.bias"] = p["image.final_norm.bias"]
    sd[f"{t}.embeddings.token_embedding.weight"] = p["text.token_embed.embedding"]
    sd[f"{t}.embeddings.position_embedding.weight"] = p["text.pos_embed"]
    sd[f"{t}.final_layer_norm.weight"] = p["text.final_norm.scale"]
    sd[f"{t}.final_layer_norm.bias"] = p["text.final_norm.bias"]
    _hf_layers(sd, p, "image", v, img["depth"])
    _hf_layers(sd, p, "text", t, txt["depth"])
    if style == "clip":
        _common_clip_checks(model_cfg, fmt)
        eos = txt.get("eos_id")
        _check(eos != 2 or eos == txt["vocab_size"] - 1,
               "text eos_id 2 (transformers reads eos_token_id=2 as a legacy config and pools at "
               "the largest id instead)", fmt)
        sd[f"{v}.embeddings.patch_embedding.weight"] = kernel.transpose(3, 2, 0, 1)
        sd[f"{v}.embeddings.class_embedding"] = p["image.cls_token"]
        sd[f"{v}.pre_layrnorm.weight"] = p["image.pre_norm.scale"]
        sd[f"{v}.pre_layrnorm.bias"] = p["image.pre_norm.bias"]
        sd["visual_projection.weight"] = p["image_projection.kernel"].T
        sd["text_projection.weight"] = p["text_projection.kernel"].T
        sd["logit_scale"] = p["logit_scale"].reshape(())
        vision_cfg.update(image_size=img["image_size"], projection_dim=model_cfg["embed_dim"])
        text_cfg.update(eos_token_id=int(eos), projection_dim=model_cfg["embed_dim"],
                        bos_token_id=txt.get("bos_id", int(eos) - 1),
                        pad_token_id=txt.get("pad_id", 0))
        config = dict(model_type="clip", architectures=["CLIPModel"],
                      projection_dim=model_cfg["embed_dim"], text_config=text_cfg,
                      vision_config=vision_cfg, torch_dtype="float32",
                      logit_scale_init_value=float(p["logit_scale"]))
        prep = dict(image_processor_type="CLIPImageProcessor", image_mean=mean, image_std=std,
                    size={"shortest_edge": img["image_size"]},
                    crop_size={"height": img["image_size"], "width": img["image_size"]},
                    do_center_crop=True, do_resize=True, do_normalize=True, do_rescale=True,
                    resample=3)
    else:
        _check(not img.get("pre_norm", False), "no ln_pre in a SigLIP image tower", fmt)
        _check(img.get("patch_bias", True), "a SigLIP patch embedding has a bias", fmt)
        _check(not model_cfg.get("project_image", True),
               "SigLIP uses the MAP head output as the image embedding (project_image=False)",
               fmt)
        _check(bool(model_cfg.get("text_projection_bias")), "a biased text head", fmt)
        _check(txt.get("pool_type") == "last" and not txt.get("causal", True),
               "a SigLIP text tower: no causal mask, pooled at the last position", fmt)
        _check(model_cfg.get("logit_bias_init") is not None, "a logit_bias", fmt)
        ps, width = img["patch_size"], img["width"]
        if model_type == "siglip2":
            sd[f"{v}.embeddings.patch_embedding.weight"] = kernel.reshape(ps * ps * 3, width).T
            vision_cfg.update(num_patches=int(p["image.pos_embed"].shape[0]))
        else:
            sd[f"{v}.embeddings.patch_embedding.weight"] = kernel.transpose(3, 2, 0, 1)
            vision_cfg.update(image_size=img["image_size"])
        sd[f"{v}.embeddings.patch_embedding.bias"] = p["image.patch_embed.bias"]
        h = f"{v}.head."
        sd[h + "probe"] = p["image.map_head.probe"]
        q, k, vv = (p[f"image.map_head.attn.{n}.kernel"] for n in ("query", "key", "value"))
        sd[h + "attention.in_proj_weight"] = np.concatenate(
            [w.reshape(width, -1).T for w in (q, k, vv)])
        sd[h + "attention.in_proj_bias"] = np.concatenate(
            [p[f"image.map_head.attn.{n}.bias"].reshape(-1) for n in ("query", "key", "value")])
        sd[h + "attention.out_proj.weight"] = p["image.map_head.attn.out.kernel"].reshape(
            -1, width).T
        sd[h + "attention.out_proj.bias"] = p["image.map_head.attn.out.bias"]
        sd[h + "layernorm.weight"] = p["image.map_head.norm.scale"]
        sd[h + "layernorm.bias"] = p["image.map_head.norm.bias"]
        for n in ("fc1", "fc2"):
            sd[f"{h}mlp.{n}.weight"] = p[f"image.map_head.mlp.{n}.kernel"].T
            sd[f"{h}mlp.{n}.bias"] = p[f"image.map_head.mlp.{n}.bias"]
        sd[f"{t}.head.weight"] = p["text_projection.kernel"].T
        sd[f"{t}.head.bias"] = p["text_projection.bias"]
        sd["logit_scale"] = p["logit_scale"].reshape(1)
        sd["logit_bias"] = p["logit_bias"].reshape(1)
        text_cfg.update(projection_size=model_cfg["embed_dim"])
        arch = "Siglip2Model" if model_type == "siglip2" else "SiglipModel"
        config = dict(model_type=model_type, architectures=[arch], text_config=text_cfg,
                      vision_config=vision_cfg, torch_dtype="float32")
        if model_type == "siglip2":
            prep = dict(image_processor_type="Siglip2ImageProcessor", image_mean=mean,
                        image_std=std, patch_size=ps, max_num_patches=vision_cfg["num_patches"],
                        do_resize=True, do_normalize=True, do_rescale=True, resample=2)
        else:
            prep = dict(image_processor_type="SiglipImageProcessor", image_mean=mean,
                        image_std=std, size={"height": img["image_size"],
                                             "width": img["image_size"]},
                        do_resize=True, do_normalize=True, do_rescale=True, resample=2)
    recorded = (token_ids or {}).get("text_config_token_ids", {})  # kept by an import
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                         ("pad_id", "pad_token_id")):
        value = recorded.get(theirs, (token_ids or {}).get(ours))
        if value is not None and not (style == "clip" and ours == "eos_id"):
            text_cfg[theirs] = int(value)
    p.check_all_used(fmt)
    return sd, config, prep


# -------------------------------------------------------------------------------------------
# The command.
# -------------------------------------------------------------------------------------------


def load_workdir(workdir: str | pathlib.Path, step: int | None = None
                 ) -> tuple[dict, dict, int]:
    """``(params, model config, step)`` of a workdir: the latest (or ``step``) checkpoint's
    parameters as a pure dict of host arrays, and ``config.json``'s ``model``."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel
    from vlm_jax.models.clip import to_plain_dict  # pylint: disable=import-outside-toplevel

    workdir = epath.Path(workdir)
    if not (workdir / "config.json").exists():
        raise ckpt_lib.CheckpointError(f"{workdir} has no config.json: not a vlm_jax workdir "
                                       "(vlm-jax train / convert write one).")
    model_cfg = to_plain_dict(json.loads((workdir / "config.json").read_text())["model"])
    build = get_family(model_cfg).build_model
    abstract = nnx.state(nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0))), nnx.Param)
    abstract = abstract.to_pure_dict()
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every_steps=1, keep=10**6,
                                 async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ckpt_lib.CheckpointError(f"No checkpoint in {workdir / 'checkpoints'}.")
        params = ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()
    import jax  # pylint: disable=import-outside-toplevel

    return jax.tree.map(np.asarray, params), model_cfg, step


def _save(sd: Mapping[str, np.ndarray], path) -> None:
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

    # np.array, not np.ascontiguousarray: that makes 0-d arrays (logit_scale) 1-d. Bytes, then
    # one write: the path may be gs://.
    path.write_bytes(save({k: np.array(v, np.float32, order="C") for k, v in sd.items()},
                          metadata={"format": "pt"}))


def export(workdir: str | pathlib.Path, fmt: str, output: str | pathlib.Path, *,
           step: int | None = None, hf_model_type: str | None = None):
    """Writes the workdir's model to ``output`` (a new or empty directory, local or gs://) in
    ``fmt`` (``'open_clip'`` or ``'hf'``; see the module docstring). Returns ``output`` (an
    ``epath.Path``)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {FORMATS}.")
    if hf_model_type is not None and fmt != "hf":
        raise ExportError("--hf_model_type is for --format hf.")
    from etils import epath  # pylint: disable=import-outside-toplevel

    out = epath.Path(output)  # gs:// too
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--output {out} is not empty; export into a new directory.")
    params, model_cfg, step = load_workdir(workdir, step)
    # SigLIP 2's training-only heads and mask token (model.ssl_prototypes) are not part of the
    # released encoder (big_vision's SigLIP 2 checkpoints have none): left out.
    params = {k: v for k, v in params.items() if not str(k).startswith("ssl_")}
    if fmt == "open_clip":
        sd, cfg = to_open_clip(params, model_cfg)
        out.mkdir(parents=True, exist_ok=True)
        _save(sd, out / "open_clip_model.safetensors")
        (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    else:
        tok = epath.Path(workdir) / "tokenizer"
        spec = tok / "tokenizer_spec.json"
        token_ids = json.loads(spec.read_text()) if spec.exists() else None
        sd, cfg, prep = to_hf(params, model_cfg, hf_model_type, token_ids)
        out.mkdir(parents=True, exist_ok=True)
        _save(sd, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        (out / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
        if tok.is_dir():  # The tokenizer an import kept: transformers' files as they were.
            for f in tok.iterdir():
                if f.name != "tokenizer_spec.json":
                    (out / f.name).write_bytes(f.read_bytes())
    n = sum(v.size for v in sd.values())
    print(f"Exported step {step} of {workdir} ({n / 1e6:.1f}M parameters) as {fmt} into {out}.")
    return out
