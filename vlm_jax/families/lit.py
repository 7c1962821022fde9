r"""LiT and SigLiT: contrastive tuning of one tower against a locked, pretrained other tower.

Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning" (CVPR 2022): a pretrained
image tower is locked (no gradient, no optimizer state) and a text tower learns to map captions
onto its embeddings, with CLIP's softmax loss (LiT) or SigLIP's sigmoid loss (SigLiT, Zhai et
al. 2023). The model, the losses and the evaluations are the CLIP family's
(:mod:`vlm_jax.families.clip`: :class:`vlm_jax.models.clip.CLIP`, ``clip.batch_loss``); what
this family adds is the lock and the option to train on cached embeddings::

    c.model = dict(name='lit', locked='image', embed_dim=..., image=..., text=..., ...)
    c.init_from = dict(image=dict(workdir='runs/clip_tiny', subtree='image'),
                       image_projection=dict(workdir='runs/clip_tiny',
                                             subtree='image_projection'))

``model.locked``: ``'image'`` (LiT) locks ``image`` and ``image_projection``; ``'text'`` locks
``text`` and ``text_projection``. The locked parameters get no gradient and no optimizer state
whatever ``optim.trainable`` says (``Family.locked``, :func:`vlm_jax.optim.trainable_mask`), so
they leave training bit for bit as ``init_from`` loaded them (a run, or a ``vlm-jax convert``-ed
OpenAI / open_clip model: both are workdirs). The towers hold no train-mode state (no dropout,
no batch statistics), so a locked tower computes in training the function it computes in
evaluation.

**Cached embeddings.** A locked image tower without augmentation gives an image the same
embedding every epoch. ``vlm-jax data embed --config <this> --output DIR`` computes them once
(:mod:`vlm_jax.embed`; ArrayRecord, one record per training pair: the embedding and the
caption); ``--config.data.name=image_embeddings --config.data.train_files=DIR`` then trains on
them: the batch is ``{'image_emb' float32 [B, embed_dim], 'text' int32 [B, L]}`` and the step
runs the text tower only. On the shapes data the cached stream is the live one (same shuffle,
same pairs at every step), and the losses equal the live tower's within float tolerance
(``tests/test_lit.py``). The run still loads the locked tower (``init_from``): evaluation reads
images.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from vlm_jax import data as data_lib
from vlm_jax.config import ConfigError
from vlm_jax.families import Family, clip
from vlm_jax.models.clip import to_plain_dict, tower_flops

# model.locked -> the parameter paths it locks (a tower and its projection).
LOCKABLE = {"image": ("image", "image_projection"), "text": ("text", "text_projection")}
# The batch key of cached image embeddings (`vlm-jax data embed`, data.name="image_embeddings").
CACHED_KEY = "image_emb"


def locked_tower(model_cfg) -> str:
    """``model.locked`` of a LiT model config, checked."""
    tower = model_cfg["locked"] if "locked" in model_cfg else None
    if tower not in LOCKABLE:
        raise ConfigError(f"config.model.locked={tower!r}: the tower LiT keeps locked, one of "
                          f"{sorted(LOCKABLE)} ('image' is LiT).")
    return tower


def locked(config) -> tuple[str, ...]:
    """The parameter paths of the locked tower (``Family.locked``)."""
    return LOCKABLE[locked_tower(config.model)]


def clip_config(model_cfg) -> dict:
    """The CLIP model config of a LiT model config (without ``locked``)."""
    cfg = to_plain_dict(model_cfg)
    locked_tower(cfg)
    cfg.pop("locked")
    cfg["name"] = "clip"
    return cfg


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.clip.CLIP` from ``config.model`` (``locked`` aside)."""
    return clip.build_model(clip_config(model_cfg), rngs)


def cached(config) -> bool:
    """Whether the run trains on cached image embeddings (``data.name='image_embeddings'``)."""
    return config.data.name == data_lib.EMBEDDINGS


def embed(model, batch, config):
    """The per-example embeddings of a (micro-)batch, the locked tower's without gradient: from
    the batch when it carries cached ones (``image_emb``), else computed by the locked tower."""
    tower = locked_tower(config.model)
    if CACHED_KEY in batch:
        image_emb = batch[CACHED_KEY].astype(np.float32)
    else:
        image_emb = model.encode_image(batch["image"])
    text_emb = model.encode_text(batch["text"])
    if tower == "image":
        image_emb = jax.lax.stop_gradient(image_emb)
    else:
        text_emb = jax.lax.stop_gradient(text_emb)
    return {"image_emb": image_emb, "text_emb": text_emb}, 0.0, {}


def objective(model, batch, config, mesh):
    """CLIP's (or SigLIP's, ``loss.name='sigmoid'``) loss, :func:`vlm_jax.families.clip.batch_loss`,
    on :func:`embed`."""
    emb, _, _ = embed(model, batch, config)
    return clip.batch_loss(model, emb, config, mesh)


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """CLIP's image-text pairs, or with cached embeddings ``image_emb`` float32
    ``[B, embed_dim]`` and ``text`` int32 ``[B, L]``: no image in the step."""
    if not cached(config):
        return clip.batch_spec(config)
    if locked_tower(config.model) != "image":
        raise ConfigError("config.data.name='image_embeddings' caches the locked image tower's "
                          "embeddings: set config.model.locked='image'.")
    b = config.batch_size
    return {CACHED_KEY: jax.ShapeDtypeStruct((b, config.model.embed_dim), np.float32),
            "text": jax.ShapeDtypeStruct((b, config.model.text.context_length), np.int32)}


def make_data(config, for_eval: bool = False):
    """CLIP's data, or the cached embeddings of ``data.train_files``
    (:func:`vlm_jax.data.prepare_embeddings`), checked against this run's locked tower."""
    if not cached(config):
        return clip.make_data(config, for_eval=for_eval)
    data = data_lib.prepare_embeddings(config, for_eval=for_eval)
    check_cache(config, data.meta, data.directory)
    return data


def check_cache(config, meta: dict, directory: str) -> None:
    """Refuses cached embeddings computed by another tower than the one this run locks: the
    locked parts' model config and their ``init_from`` sources (workdir, subtree, the step
    read) must be the cache's.

    Raises:
        ConfigError: naming the first difference and the command that recomputes the cache.
    """
    parts = locked(config)
    fix = (f"; compute embeddings for this run with `vlm-jax data embed --config <this config> "
           f"--output DIR`, or train with the config that wrote {directory}.")
    want = json.loads(json.dumps(tower_config(config.model)))  # as embeddings.json holds it
    if meta["tower"] != want:
        raise ConfigError(f"config.data.train_files={directory}: the embeddings were computed by "
                          f"the locked tower {meta['tower']}, this run's is {want}" + fix)
    init_from = {k: dict(v) for k, v in config.init_from.items()} if config.init_from else {}
    for part in parts:
        have, spec = meta["init_from"].get(part), init_from.get(part)
        if spec is None or have is None:
            if spec is not None or have is not None:
                raise ConfigError(
                    f"config.data.train_files={directory}: the embeddings' {part!r} came from "
                    f"{have or 'a random initialisation'}, this run's config.init_from.{part} is "
                    f"{spec}" + fix)
            if meta["config"]["seed"] != config.seed:  # a random tower: the seed draws it
                raise ConfigError(
                    f"config.data.train_files={directory}: the embeddings are of a random "
                    f"{part!r} drawn with seed {meta['config']['seed']}, this run's seed is "
                    f"{config.seed}" + fix)
            continue
        step = spec.get("step")
        if step is None:
            step = data_lib.latest_checkpoint_step(spec["workdir"])
        if (str(spec["workdir"]), str(spec.get("subtree", "")), step) != (
                have["workdir"], have["subtree"], have["step"]):
            raise ConfigError(
                f"config.data.train_files={directory}: the embeddings' {part!r} came from "
                f"{have}, this run's config.init_from.{part} is {spec} (step {step})" + fix)
    if meta["num_records"] < config.batch_size:
        raise ConfigError(f"config.data.train_files={directory} holds {meta['num_records']} "
                          f"records, fewer than one batch of {config.batch_size}.")


def tower_config(model_cfg) -> dict:
    """The config of the locked image side (what its embeddings depend on): the image tower,
    ``embed_dim`` and the model-wide settings it reads."""
    cfg = clip_config(model_cfg)
    return {k: cfg[k] for k in ("embed_dim", "image", "dtype", "project_image") if k in cfg}


def flops_per_example(model_cfg, batch_size: int | None = None) -> float:
    """Forward-equivalent matmul FLOPs per pair: ``3 x`` this is a training step's FLOPs per
    pair, the trained tower's forward and backward (3 x its forward) plus the locked tower's
    forward only (counted as 1/3 here). A step on cached image embeddings does not run the
    locked tower: :func:`step_flops`."""
    towers = tower_flops(clip_config(model_cfg))
    lock = "image" if locked_tower(model_cfg) == "image" else "text"
    train = "text" if lock == "image" else "image"
    flops = towers[train] + towers[lock] / 3.0
    if batch_size:
        flops += 2.0 * batch_size * model_cfg["embed_dim"]
    return float(flops)


def run_tokenizer(config, workdir=None):
    """CLIP's (:func:`vlm_jax.families.clip.run_tokenizer`), or on cached embeddings that of the
    data they were computed from."""
    if cached(config):
        return make_data(config, for_eval=True).tokenizer
    return clip.run_tokenizer(config, workdir)


def step_flops(config) -> float:
    """The train step's forward-equivalent FLOPs per pair (``Family.step_flops``): on cached
    embeddings the text tower's forward and backward only (no image tower), else
    :func:`flops_per_example`."""
    if not cached(config):
        return flops_per_example(config.model)
    return float(tower_flops(clip_config(config.model))["text"])


FAMILY = Family(name="lit", build_model=build_model, objective=objective,
                batch_spec=batch_spec, make_data=make_data, default_evals=clip.default_evals,
                flops_per_example=flops_per_example, capabilities=frozenset({"embed"}),
                image_size=clip.image_size, embed=embed, batch_loss=clip.batch_loss,
                after_update=clip.after_update, locked=locked, step_flops=step_flops,
                run_tokenizer=run_tokenizer)
