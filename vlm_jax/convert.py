"""Import OpenAI CLIP and open_clip weights: ``vlm-jax convert``.

    vlm-jax convert --input ViT-B-32.safetensors --workdir runs/openai_b32 --act quick_gelu
    vlm-jax eval --workdir runs/openai_b32 --config.eval.dataset=tfds:imagenet2012

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
A wrong choice still loads and silently costs accuracy, so the command asks for it.

Covered: the ViT-B/32, B/16, L/14 (and other ViT) families of OpenAI and open_clip, and open_clip's
CoCa (``coca_ViT-B-32``, ``coca_ViT-L-14``: recognised by its ``text_decoder``). Not covered,
with an error naming the keys: ModifiedResNet towers (RN50...), timm or Hugging Face towers,
attentional pooling and layer scale.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

ACTIVATIONS = ("quick_gelu", "gelu")
HEAD_WIDTH = 64  # OpenAI / open_clip ViT CLIPs: heads = width // 64.


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, the key and the fix."""


# -------------------------------------------------------------------------------------------
# Reading state dicts.
# -------------------------------------------------------------------------------------------


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a CLIP state dict as ``{key: float32 numpy array}`` (non-tensor entries dropped)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist; pass the .safetensors / .pt / .bin file of "
                           "an OpenAI CLIP or open_clip model with --input.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # pylint: disable=import-outside-toplevel

        out = {}
        # The flax framework reads bfloat16 too (numpy has no bfloat16).
        with safe_open(str(path), framework="flax") as f:
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        return _clean(out, path)
    if path.suffix in (".pt", ".bin", ".pth"):
        try:
            import torch  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ConvertError(
                f"{path} is a PyTorch file: install torch (pip install torch) to read it, or "
                "convert it to .safetensors first.") from e
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # OpenAI's releases are TorchScript archives.
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict.")
        return _clean({k: v.float().numpy() for k, v in obj.items()
                       if isinstance(v, torch.Tensor) and v.ndim is not None}, path)
    raise ConvertError(f"{path}: unknown format {path.suffix!r}; use .safetensors, .pt or .bin.")


def _clean(sd: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    if sd and all(k.startswith("module.") for k in sd):  # Saved from DistributedDataParallel.
        sd = {k[len("module."):]: v for k, v in sd.items()}
    # OpenAI's archives carry these as 0-d tensors; they are read from the shapes instead.
    for k in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(k, None)
    if not sd:
        raise ConvertError(f"{path} holds no tensors.")
    return sd


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


class _Tracked(dict):
    """A state dict that records which keys were read (every key must be used)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


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


def _ln(out, dst, sd, src):
    out[dst + ".scale"], out[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]


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


def to_model_params(flat: Mapping[str, Any], abstract_params) -> Any:
    """Arranges ``flat`` (from :func:`convert_state_dict`) as the model's parameter state.

    ``abstract_params``: ``nnx.state(model, nnx.Param)`` of an (abstract) model built from the
    inferred config; layer-stacked parameters (``scan_layers=True``) are stacked here. Raises
    ConvertError naming the first parameter whose shape differs.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    def fill(path, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        name = name.removesuffix(".value")
        if name in flat:
            value = flat[name]
        else:  # scanned: 'image.encoder.blocks.attn.query.kernel' stacks blocks.0, blocks.1...
            head, _, tail = name.partition("blocks.")
            n = leaf.shape[0]
            missing = [f"{head}blocks.{i}.{tail}" for i in range(n)
                       if f"{head}blocks.{i}.{tail}" not in flat]
            if not tail or missing:
                raise ConvertError(f"No weight converted for parameter {name}.")
            value = jnp.stack([jnp.asarray(flat[f"{head}blocks.{i}.{tail}"]) for i in range(n)])
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConvertError(f"Parameter {name}: converted shape {tuple(value.shape)}, the "
                               f"model has {tuple(leaf.shape)}.")
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_params)


# -------------------------------------------------------------------------------------------
# The command.
# -------------------------------------------------------------------------------------------


def convert(input_path: str, workdir: str, *, act: str, base_config=None) -> pathlib.Path:
    """Converts ``input_path`` into ``workdir`` (``checkpoints/0`` + ``config.json``).

    ``base_config``: the run config whose data/eval/optimizer settings the workdir gets (default
    ``experiments/clip_openai.py``); its ``model`` is replaced by the inferred one, keeping its
    ``dtype``, ``scan_layers`` and ``remat``. Refuses a workdir that already holds checkpoints.
    """
    from etils import epath  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax import models  # pylint: disable=import-outside-toplevel

    sd = load_state_dict(input_path)
    coca = is_coca(sd)
    model_cfg = infer_coca_config(sd, act=act) if coca else infer_model_config(sd, act=act)
    if base_config is None:
        base_config = config_lib.load_config(
            str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "clip_openai.py"))
    config = base_config
    for key in ("dtype", "scan_layers", "remat"):  # How to run it: the base config's choice.
        if key in config.get("model", {}):
            model_cfg[key] = config.model[key]
    with config.unlocked():
        config.model = model_cfg
        config.name = f"converted:{pathlib.Path(input_path).name}"
    abstract = nnx.state(nnx.eval_shape(lambda: models.build_model(model_cfg,
                                                                   rngs=nnx.Rngs(0))), nnx.Param)
    # The train state's layout: plain nested dicts of arrays (nnx.State.to_pure_dict()).
    flat = (convert_coca_state_dict if coca else convert_state_dict)(sd, model_cfg)
    params = to_model_params(flat, abstract).to_pure_dict()
    workdir = epath.Path(workdir)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every_steps=1, keep=1,
                                 async_save=False)
    if ckpt.latest_step() is not None:
        raise ckpt_lib.CheckpointError(
            f"{workdir} already holds checkpoints; convert into a new --workdir.")
    ckpt.save(0, {"params": params}, config=json.loads(config_lib.to_json(config)), force=True)
    ckpt.close()
    (workdir / "config.json").write_text(config_lib.to_json(config))
    n = models.count_params(params)
    print(f"Converted {input_path} ({n / 1e6:.1f}M parameters; image {model_cfg['image']['width']}"
          f"x{model_cfg['image']['depth']} patch {model_cfg['image']['patch_size']} at "
          f"{model_cfg['image']['image_size']} px, text {model_cfg['text']['width']}x"
          f"{model_cfg['text']['depth']}, act {act}) into {workdir}.")
    return workdir
