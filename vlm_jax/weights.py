"""What every weight import shares (``vlm-jax convert``: :mod:`vlm_jax.convert` for open_clip /
OpenAI CLIP and Hugging Face language models, :mod:`vlm_jax.interop_hf` for Hugging Face CLIP /
SigLIP / SigLIP 2): reading state dicts safely, tracking that every weight is used, arranging
converted weights as a model's parameters and writing the workdir."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, the key and the fix."""


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
        if is_torchscript_archive(path):  # OpenAI's releases are TorchScript archives.
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            try:  # Tensors and plain containers only: a pickle cannot run code here.
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds)
                raise ConvertError(
                    f"{path} is not a plain state dict: torch.load(weights_only=True) refused it "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A "
                    "pickle that needs more than tensors can run arbitrary code, so it is not "
                    "loaded. If you trust the file, re-save its state dict from Python "
                    "(torch.save(model.state_dict(), 'weights.pt'), or safetensors' save_file) "
                    "and convert that.") from e
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict.")
        return _clean({k: v.float().numpy() for k, v in obj.items()
                       if isinstance(v, torch.Tensor) and v.ndim is not None}, path)
    raise ConvertError(f"{path}: unknown format {path.suffix!r}; use .safetensors, .pt or .bin.")


def is_torchscript_archive(path: str | pathlib.Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: OpenAI's CLIP releases).

    The test is torch's own (``torch.serialization._is_torchscript_zip``: a zip archive whose
    records include ``constants.pkl``), read with :mod:`zipfile` rather than through torch's
    private helper; the ``code/`` folder of compiled TorchScript is required as well. Only such
    an archive goes to ``torch.jit.load``, whose unpickler rebuilds tensors and TorchScript
    classes, never arbitrary Python objects; everything else must pass
    ``torch.load(weights_only=True)``.
    """
    import zipfile  # pylint: disable=import-outside-toplevel

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # torch's _is_zipfile: the magic at the start.
                return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    # torch archives put every record under one top folder ('archive/' or the file's stem).
    records = {n.split("/", 1)[1] for n in names if "/" in n}
    return "constants.pkl" in records and any(r.startswith("code/") for r in records)


def _clean(sd: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    if sd and all(k.startswith("module.") for k in sd):  # Saved from DistributedDataParallel.
        sd = {k[len("module."):]: v for k, v in sd.items()}
    # OpenAI's archives carry these as 0-d tensors; they are read from the shapes instead.
    for k in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(k, None)
    if not sd:
        raise ConvertError(f"{path} holds no tensors.")
    return sd


class _Tracked(dict):
    """A state dict that records which keys were read (every key must be used)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key):
        if key not in self:
            raise ConvertError(f"The state dict has no {key!r}, a weight the converted model "
                               "needs (a truncated file, or another architecture).")
        self.used.add(key)
        return super().__getitem__(key)


def _ln(out, dst, sd, src):
    out[dst + ".scale"], out[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]


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


def load_hf_lm(directory: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(state dict, config.json)`` of a Hugging Face model directory, as ``save_pretrained``
    writes it: ``model.safetensors``, shards listed in ``model.safetensors.index.json``, or
    ``pytorch_model.bin`` (with torch)."""
    d = pathlib.Path(directory)
    if not (d / "config.json").exists():
        raise ConvertError(f"{d} has no config.json: a Hugging Face model directory holds "
                           "config.json and model.safetensors (as save_pretrained writes them).")
    hf_config = json.loads((d / "config.json").read_text())
    if (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif (d / "model.safetensors.index.json").exists():
        index = json.loads((d / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (d / "pytorch_model.bin").exists():
        files = ["pytorch_model.bin"]
    else:
        raise ConvertError(f"{d} has no model.safetensors (nor model.safetensors.index.json or "
                           "pytorch_model.bin).")
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update(load_state_dict(d / f))
    return sd, hf_config


def _hf(hf_config: Mapping, key: str, default: Any = ...) -> Any:
    if key in hf_config and hf_config[key] is not None:
        return hf_config[key]
    if default is ...:
        raise ConvertError(f"config.json has no {key!r} (model_type "
                           f"{hf_config.get('model_type')!r}).")
    return default


def write_workdir(workdir: str | pathlib.Path, params: Any, config) -> Any:
    """Writes converted ``params`` (a pure dict, as ``nnx.state(model).to_pure_dict()``) as
    checkpoint 0 of ``workdir``, with the run ``config`` saved beside it and as
    ``config.json``: what ``vlm-jax eval`` / ``train`` restore. Refuses a workdir that already
    holds checkpoints. Returns the workdir (an ``epath.Path``)."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel

    workdir = epath.Path(workdir)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every_steps=1, keep=1,
                                 async_save=False)
    if ckpt.latest_step() is not None:
        raise ckpt_lib.CheckpointError(
            f"{workdir} already holds checkpoints; convert into a new --workdir.")
    ckpt.save(0, {"params": params}, config=json.loads(config_lib.to_json(config)), force=True)
    ckpt.close()
    (workdir / "config.json").write_text(config_lib.to_json(config))
    return workdir
