"""CLIP and SigLIP: dual-encoder contrastive training on image-text pairs.

The two differ only in the loss (``config.loss.name``: ``'softmax'`` CLIP, ``'sigmoid'``
SigLIP) and SigLIP's learned logit bias (``config.model.logit_bias_init``); the model is
:class:`vlm_jax.models.clip.CLIP` (see that module for the config layout).

SigLIP 2's self-supervised terms (Tschannen et al. 2025, Sec. 2.3; :mod:`vlm_jax.distill`) are
switches of the same family: ``config.loss.self_distill_weight`` (SILC local-to-global
self-distillation) and ``config.loss.masked_pred_weight`` (TIPS masked prediction), on from
``config.loss.ssl_start_fraction`` of ``total_steps``, against an EMA teacher of the image tower
and the heads kept in the train state (:func:`teacher_params`, :func:`update_teacher`). Both 0
(the default): the objective, the state and the step are CLIP's / SigLIP's as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from vlm_jax import data as data_lib
from vlm_jax import distill, losses
from vlm_jax.config import ConfigError
from vlm_jax.families import Family
from vlm_jax.models.clip import CLIP, clip_flops

LOSSES = ("softmax", "sigmoid")


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.clip.CLIP` from ``config.model`` (dict or ConfigDict)."""
    return CLIP.from_config(model_cfg, rngs=rngs)


def embed(model, batch, config):
    """The per-example embeddings of a (micro-)batch: ``{'image_emb', 'text_emb'}`` (normalised
    float32), no local loss term."""
    del config
    out = model(batch["image"], batch["text"])
    return {"image_emb": out["image_emb"], "text_emb": out["text_emb"]}, 0.0, {}


@jax.named_scope("contrastive_loss")
def batch_loss(model, emb, config, mesh):
    """The contrastive loss over a whole batch's embeddings ``emb`` (:func:`embed`), across all
    devices (the global B x B logits are never built on one device), with the model's
    temperature (and SigLIP's bias).

    ``config.loss.name``: ``'softmax'`` (CLIP's symmetric InfoNCE,
    :func:`vlm_jax.losses.contrastive_loss`) or ``'sigmoid'`` (SigLIP,
    :func:`vlm_jax.losses.sigmoid_loss`; needs ``model.logit_bias_init``).
    ``config.loss.variant`` picks the distributed algorithm (``gather``, ``ring``, ``chunked``
    for softmax, ``ring_recompute`` in O(b x D) memory; ``ring``, ``gather``, ``ring_recompute`` for
    sigmoid).
    """
    name = config.loss.name
    if name not in LOSSES:
        raise ConfigError(f"config.loss.name={name!r}; valid: {list(LOSSES)}.")
    scale = model.temperature()
    bias = None if model.logit_bias is None else model.logit_bias[...].astype(jnp.float32)
    try:
        if name == "sigmoid":
            if bias is None:
                raise ConfigError("config.loss.name='sigmoid' needs a learned bias: set "
                                  "config.model.logit_bias_init (SigLIP: -10.0).")
            loss, metrics = losses.sigmoid_loss(
                emb["image_emb"], emb["text_emb"], scale, bias, mesh=mesh,
                variant=config.loss.variant)
        else:
            loss, metrics = losses.contrastive_loss(
                emb["image_emb"], emb["text_emb"], scale, mesh=mesh,
                **contrastive_kwargs(config.loss))
    except ValueError as e:
        if "variant" in str(e):
            raise ConfigError(f"config.loss.variant: {e}") from e
        raise
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics["train/logit_scale"] = scale
    if bias is not None:
        metrics["train/logit_bias"] = bias
    return loss, metrics


def objective(model, batch, config, mesh, ctx=None, *, embed_fn=None):
    """:func:`batch_loss` on the embeddings of the whole batch (:func:`embed`, or a family's
    ``embed_fn`` whose local term is added: the LocCa decoder's,
    :mod:`vlm_jax.families.locca`), plus SigLIP 2's self-supervised terms when they are
    switched on (:func:`ssl_active`): ``ctx`` then holds the train state's ``step`` and
    ``teacher`` (:func:`teacher_params`)."""
    emb, local, local_metrics = (embed if embed_fn is None else embed_fn)(model, batch, config)
    loss, metrics = batch_loss(model, emb, config, mesh)
    if embed_fn is not None:
        metrics.update(local_metrics)
        metrics["train/contrastive_loss"] = loss
        loss = loss + local
    if ctx is None:
        return loss, metrics
    step = ctx["step"]
    on = step >= ssl_start_step(config)
    # lax.cond: before the start step the views, the teacher and the heads are not computed
    # at all (SigLIP 2 adds the terms for the last 20 % of training only). The model's state
    # enters as an operand, not a closure: NNX refuses modules from another trace level (the
    # scanned layer stack, model.scan_layers, is an nnx.scan inside the branch).
    graphdef, state = nnx.split(model)

    def terms(state, teacher, images, step):
        return ssl_loss_terms(nnx.merge(graphdef, state), teacher, images, step, config)

    def zeros(*_):
        return jnp.zeros((), jnp.float32), _zero_ssl_metrics(config)

    ssl_loss, ssl_metrics = jax.lax.cond(on, terms, zeros, state, ctx["teacher"],
                                         batch["image"], step)
    metrics.update(ssl_metrics)
    metrics.setdefault("train/contrastive_loss", loss)
    return loss + ssl_loss, metrics


# ------------------------------------------------------------------------------------------------
# SigLIP 2: self-distillation and masked prediction (vlm_jax/distill.py).

# The parameters the EMA teacher keeps: the image tower and the two projection heads (the
# text tower, the projections and the mask token are the student's only).
TEACHER_KEYS = ("image", "ssl_head", "ssl_patch_head")


def ssl_active(config) -> bool:
    """Whether either SigLIP 2 term is switched on (a positive weight).

    Raises:
        ConfigError: a term is on but the model has no heads (``model.ssl_prototypes``).
    """
    on = bool(config.loss.self_distill_weight) or bool(config.loss.masked_pred_weight)
    if on and not config.model.get("ssl_prototypes", 0):
        raise ConfigError("config.loss.self_distill_weight / masked_pred_weight need the "
                          "projection heads: set config.model.ssl_prototypes (e.g. 1024).")
    return on


def ssl_start_step(config) -> int:
    """The first step with the self-supervised terms: ``ssl_start_fraction x total_steps``."""
    f = float(config.loss.ssl_start_fraction)
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"config.loss.ssl_start_fraction={f}: a fraction of total_steps in "
                          "[0, 1) (SigLIP 2: 0.8).")
    return int(round(f * config.total_steps))


def teacher_params(params, config):
    """The EMA teacher's part of ``params`` (:data:`TEACHER_KEYS`), or None when SigLIP 2's
    terms are off. Also maps the parameter shardings to the teacher's (a pure selection)."""
    if not ssl_active(config):
        return None
    return {k: params[k] for k in TEACHER_KEYS}


def update_teacher(teacher, params, step, config):
    """The teacher after the update of step ``step`` (``params``: the student after it).

    Up to the start step the teacher is a copy of the student, so that at the start it
    equals the student ("initializing the teacher with the student parameters", SigLIP 2
    Sec. 2.3); from then on ``m x teacher + (1 - m) x student`` with a fixed momentum
    ``m = config.loss.ema_momentum`` (SILC keeps the momentum fixed, not annealed to 1)."""
    student = teacher_params(params, config)
    ema = distill.ema_update(teacher, student, config.loss.ema_momentum)
    copy = step + 1 <= ssl_start_step(config)
    return jax.tree.map(lambda s_, e: jnp.where(copy, s_.astype(e.dtype), e), student, ema)


def _zero_ssl_metrics(config) -> dict:
    keys = []
    if config.loss.self_distill_weight:
        keys.append("train/self_distill_loss")
    if config.loss.masked_pred_weight:
        keys.append("train/masked_pred_loss")
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def _submodule(module, params):
    """``module``'s graph with ``params`` (a pure dict of its state)."""
    return nnx.merge(nnx.graphdef(module), params)


def local_view_size(config) -> int:
    """The side of the local views: ``loss.local_size``, or (0) DINO's 96/224 of the image
    side rounded to a multiple of the patch size."""
    img = config.model.image
    side = int(img.image_size if isinstance(img.image_size, int) else img.image_size[0])
    p = int(img.get("patch_size", 16) or 16)
    size = int(config.loss.local_size) or max(p, int(round(side * 96 / 224 / p)) * p)
    if size % p:
        raise ConfigError(f"config.loss.local_size={size}: a multiple of the patch size {p}.")
    return size


def ssl_loss_terms(model, teacher, images, step, config):
    """``(weighted sum, metrics)`` of SigLIP 2's self-supervised terms on a batch of images.

    The views are made on the device from the step's key (``fold_in(key(seed), step)``): one
    global view (a random crop of ``global_crop_scale`` of the area at the model's size), seen
    by the teacher, and ``local_views`` local views (``local_crop_scale``, at
    :func:`local_view_size`) seen by the student. SigLIP's loss keeps the original images, as
    SigLIP 2 and SILC do ("data augmentation does not negatively impact the image-text
    alignment"). Self-distillation: the student's pooled local features against the teacher's
    pooled global feature through ``ssl_head``; masked prediction: the student sees the global
    view with ``mask_ratio`` of its patches replaced by ``ssl_mask_token`` and predicts the
    teacher's unmasked patch features through ``ssl_patch_head`` (TIPS: "both the student and
    the teacher see the same, global view, up to masking in the student").
    """
    lc = config.loss
    vit = model.image
    b = images.shape[0]
    side = vit.image_size[0]
    n_cls = 1 if vit.cls_token is not None else 0
    k_global, k_local, k_mask = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), step), 3)
    glob = distill.random_crops(images, k_global, side, tuple(lc.global_crop_scale))

    teacher = jax.lax.stop_gradient(teacher)
    t_vit = _submodule(vit, teacher["image"])
    t_tokens = t_vit.encode_tokens(glob)
    temps = dict(student_temp=lc.student_temp, teacher_temp=lc.teacher_temp)
    total, metrics = jnp.zeros((), jnp.float32), {}

    if lc.self_distill_weight:
        v, size = int(lc.local_views), local_view_size(config)
        keys = jax.random.split(k_local, v)
        views = jax.vmap(lambda k: distill.random_crops(images, k, size,
                                                        tuple(lc.local_crop_scale)))(keys)
        # [V, B, s, s, 3] -> [B * V, ...]: each batch shard keeps its own images' views.
        views = jnp.swapaxes(views, 0, 1).reshape(b * v, size, size, images.shape[-1])
        student = model.ssl_head(vit.pool(vit.encode_tokens(views, any_size=True)))
        student = jnp.swapaxes(student.reshape(b, v, -1), 0, 1)
        target = _submodule(model.ssl_head, teacher["ssl_head"])(t_vit.pool(t_tokens))
        sd = distill.self_distillation_loss(student, target, **temps)
        total = total + lc.self_distill_weight * sd
        metrics["train/self_distill_loss"] = sd

    if lc.masked_pred_weight:
        mask = distill.random_patch_mask(k_mask, b, vit.num_patches, float(lc.mask_ratio))
        s_tokens = vit.encode_tokens(glob, mask=mask, mask_token=model.ssl_mask_token[...])
        student = model.ssl_patch_head(s_tokens[:, n_cls:])
        target = _submodule(model.ssl_patch_head, teacher["ssl_patch_head"])(t_tokens[:, n_cls:])
        mp = distill.masked_prediction_loss(student, target, mask, **temps)
        total = total + lc.masked_pred_weight * mp
        metrics["train/masked_pred_loss"] = mp
    return total, metrics


def after_update(params, config):
    """The learned temperature clamped to ``[0, logit_scale_max]`` after the update, as
    open_clip does (``logit_scale.clamp_(0, math.log(100))`` after ``optimizer.step()``): the
    forward pass uses the parameter as it is, so its gradient is never cut at the bound and it
    can come back down."""
    params = dict(params)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0,
                                     config.model.logit_scale_max)
    return params


def contrastive_kwargs(loss_config) -> dict:
    """Keyword arguments of :func:`vlm_jax.losses.contrastive_loss` from ``config.loss``."""
    kwargs = {"variant": loss_config.variant}
    if loss_config.variant == "chunked" and loss_config.chunk_size:  # 0: the default.
        kwargs["chunk_size"] = loss_config.chunk_size
    return kwargs


def image_size(config) -> int:
    """The side of the images the image tower reads."""
    return config.model.image.image_size


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """Image-text pairs: ``image`` uint8 ``[B, S, S, 3]``, ``text`` int32 ``[B, L]``."""
    return pair_batch_spec(config, image_size(config), config.model.text.context_length)


def pair_batch_spec(config, size: int, context_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The image-text batch of CLIP, SigLIP and CoCa (global shapes, no sharding)."""
    b = config.batch_size
    return {"image": jax.ShapeDtypeStruct((b, size, size, 3), np.uint8),
            "text": jax.ShapeDtypeStruct((b, context_length), np.int32)}


def make_data(config, for_eval: bool = False):
    """The shapes pairs or raw image-text shards (:func:`vlm_jax.data.prepare`)."""
    return data_lib.prepare(config, for_eval=for_eval)


def run_tokenizer(config, workdir=None):
    """The caption tokenizer of a run, no data prepared (:func:`vlm_jax.data.run_tokenizer`)."""
    return data_lib.run_tokenizer(config, workdir)


def eval_entry(kind: str, split: str = "test", **options) -> dict:
    """One entry of ``config.evals`` on the shapes data (at the run's ``data.config_name``),
    run at the end of training (``every_steps`` 0), on the whole split."""
    return dict(type=kind, dataset="shapes", split=split, every_steps=0, max_examples=0,
                options=options)


def default_evals(config) -> dict[str, dict]:
    """Zero-shot classification and image-text retrieval on the shapes test split."""
    del config
    return {"zeroshot": eval_entry("zeroshot"), "retrieval": eval_entry("retrieval")}


def flops_per_example(model_cfg, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs per image-text pair (:func:`vlm_jax.models.clip.clip_flops`)."""
    return float(clip_flops(model_cfg, batch_size=batch_size))


FAMILY = Family(name="clip", build_model=build_model, objective=objective,
                batch_spec=batch_spec, make_data=make_data, default_evals=default_evals,
                flops_per_example=flops_per_example, capabilities=frozenset({"embed"}),
                image_size=image_size, embed=embed, batch_loss=batch_loss,
                after_update=after_update,
                run_tokenizer=run_tokenizer, teacher=teacher_params,
                update_teacher=update_teacher)
