"""One :class:`Family` per model family: everything the rest of the code asks of a model.

A family (CLIP/SigLIP, LiT/SigLiT, CoCa, LocCa, LM, Flamingo) is one object in one file of this package. The train
loop, ``vlm-jax compile``, ``vlm-jax caption`` and the evaluators ask it, instead of branching on
``config.model.name``: :func:`get_family` is the only reader of that key.

* ``build_model(model_cfg, rngs)``: the NNX module (unknown config keys raise ValueError).
* ``objective(model, batch, config, mesh) -> (loss, metrics)`` on a global batch.
* ``batch_spec(config) -> {key: jax.ShapeDtypeStruct}``: global shapes and dtypes of a training
  batch, the one source for the jitted step's shardings (:func:`vlm_jax.train.make_train_step`),
  ``vlm-jax compile`` (:func:`vlm_jax.aot.abstract_batch`) and what the pipelines emit (the
  train loop checks the first batch against it). Images travel as uint8; the device
  normalises them (:func:`vlm_jax.models.layers.normalize_pixels`).
* ``make_data(config, for_eval=False)``: the run's data (:mod:`vlm_jax.data`).
* ``default_evals(config)``: the family's evaluation entries (``config.evals`` format).
* ``flops_per_example(model_cfg, batch_size=None)``: analytic forward matmul FLOPs.
* ``capabilities``: what evaluators may ask of the model (:data:`CAPABILITIES`).
* ``image_size(config)``: the image side the model reads (None: text only).

Optional, for contrastive families:

* ``embed(model, batch, config) -> (embeddings, local_loss, local_metrics)`` and
  ``batch_loss(model, embeddings, config, mesh) -> (loss, metrics)``: the objective split at the
  per-example embeddings, so that a step in micro-batches keeps every negative
  (``optim.grad_accum_steps``, :func:`vlm_jax.train.make_loss_and_grads`): the loss over the
  whole batch's embeddings plus the mean of the per-micro-batch ``local_loss`` (CoCa's
  captioning term; 0 for CLIP) equals ``objective`` on the whole batch.
* ``after_update(params, config) -> params``: constraints applied to the parameters after each
  optimizer update (CLIP's temperature clamped to ``[0, logit_scale_max]``, as open_clip).
* ``step_flops(config) -> float``: the train step's forward-equivalent FLOPs per example when
  they depend on more than the model (:meth:`Family.train_flops_per_example`).
* ``locked(config) -> tuple of parameter paths``: parts the family keeps locked whatever
  ``config.optim.trainable`` says (LiT's image tower: ``('image', 'image_projection')``): no
  gradient is computed for them and they get no optimizer state
  (:func:`vlm_jax.optim.trainable_mask`).
* ``teacher(params, config) -> pytree | None`` and ``update_teacher(teacher, params, step,
  config) -> teacher``: an EMA teacher kept in the train state (``state['teacher']``, saved
  with it), for objectives that distil from one (SigLIP 2's self-distillation and masked
  prediction, :mod:`vlm_jax.families.clip`). ``teacher`` selects the teacher's part of the
  parameters (applied to the parameter shardings too, so it must only select); None: no
  teacher. With one, ``objective`` is called with ``ctx={'step', 'teacher'}`` and the teacher
  is updated after each optimizer update.

Optional, for inference (``vlm_jax.load``, ``vlm-jax caption``):

* ``run_tokenizer(config, workdir) -> tokenizer``: the run's tokenizer without preparing data
  (:func:`vlm_jax.data.run_tokenizer`); :meth:`Family.tokenizer` falls back to ``make_data``.

Adding a family (SigLIP 2, a LLaVA-style model; ``lit.py`` is a worked example) is one new
module here that defines a ``FAMILY`` and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from vlm_jax.config import ConfigError

# What an evaluator may ask of a model (evaluators declare the capability they need):
CAPABILITIES = {
    "embed": "encode_image(images) / encode_text(tokens) -> L2-normalised embeddings",
    "caption": "an image-conditioned text decoder",
    "interleaved": "generation from images interleaved with text",
    "lm": "next-token logits over text",
    "locate": "locate(images, expressions) -> [N, 4] boxes of the referred objects",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its model, objective, batch, data, evaluations and FLOPs (see module)."""

    name: str
    build_model: Callable[[Any, Any], Any]
    objective: Callable[..., tuple[Any, dict]]
    batch_spec: Callable[[Any], dict]
    make_data: Callable[..., Any]
    default_evals: Callable[[Any], dict]
    flops_per_example: Callable[..., float]
    capabilities: frozenset[str]
    image_size: Callable[[Any], int | None]
    embed: Callable[..., tuple[dict, Any, dict]] | None = None
    batch_loss: Callable[..., tuple[Any, dict]] | None = None
    after_update: Callable[[Any, Any], Any] | None = None
    locked: Callable[[Any], tuple[str, ...]] | None = None
    step_flops: Callable[[Any], float] | None = None
    teacher: Callable[[Any, Any], Any] | None = None
    update_teacher: Callable[..., Any] | None = None
    run_tokenizer: Callable[[Any, Any], Any] | None = None

    def train_flops_per_example(self, config) -> float:
        """Forward-equivalent FLOPs per example of ``config``'s train step (3 x this is the
        step's FLOPs per example, as MFU counts them): ``step_flops(config)`` when the family
        has it (the data can change the step: LiT on cached embeddings runs no image tower),
        else ``flops_per_example(config.model)``."""
        if self.step_flops is not None:
            return float(self.step_flops(config))
        return float(self.flops_per_example(config.model))

    def locked_parts(self, config) -> tuple[str, ...]:
        """The parameter paths this family locks for ``config`` (none without ``locked``)."""
        return tuple(self.locked(config)) if self.locked is not None else ()

    def teacher_of(self, params: Any, config: Any) -> Any:
        """The EMA teacher of ``params`` under ``config`` (None: the run has none)."""
        return None if self.teacher is None else self.teacher(params, config)

    def tokenizer(self, config: Any, workdir: Any = None) -> Any:
        """The tokenizer of a run (``workdir``: where it was trained or converted), without
        building or opening data when the family knows how (``run_tokenizer``)."""
        if self.run_tokenizer is not None:
            return self.run_tokenizer(config, workdir)
        return self.make_data(config, for_eval=True).tokenizer

    @property
    def contrastive(self) -> bool:
        """Whether the objective is split at the embeddings (``embed`` / ``batch_loss``)."""
        return self.embed is not None and self.batch_loss is not None

    def __post_init__(self):
        if (self.embed is None) != (self.batch_loss is None):
            raise ValueError(f"Family {self.name!r}: embed and batch_loss go together.")
        if (self.teacher is None) != (self.update_teacher is None):
            raise ValueError(f"Family {self.name!r}: teacher and update_teacher go together.")
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"Family {self.name!r}: unknown capabilities {unknown}; known: "
                             f"{sorted(CAPABILITIES)}.")


# pylint: disable=wrong-import-position  (the family modules import Family from here)
from vlm_jax.families import clip, coca, flamingo, lit, lm, locca  # noqa: E402

FAMILIES: dict[str, Family] = {f.name: f for f in (clip.FAMILY, coca.FAMILY, lit.FAMILY,
                                                   lm.FAMILY, flamingo.FAMILY, locca.FAMILY)}


def get_family(config_or_model_cfg: Any) -> Family:
    """The family of a run config (``config.model.name``), of a model config (its ``name``) or
    of a family name.

    Raises:
        ConfigError: the name is missing or unknown (the message lists the families).
    """
    cfg = config_or_model_cfg
    if isinstance(cfg, str):
        name, key = cfg, "model.name"
    else:
        if not isinstance(cfg, Mapping) and not hasattr(cfg, "keys"):
            raise TypeError(f"get_family: expected a config, a model config or a name, got "
                            f"{type(cfg).__name__}.")
        if "model" in cfg:
            cfg = cfg["model"]
        name, key = (cfg["name"] if "name" in cfg else None), "config.model.name"
    if name not in FAMILIES:
        raise ConfigError(f"{key}={name!r} is not a model family; available: "
                          f"{sorted(FAMILIES)}.")
    return FAMILIES[name]


__all__ = ["CAPABILITIES", "FAMILIES", "Family", "get_family"]
