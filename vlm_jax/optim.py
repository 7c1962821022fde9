"""Optimizer from config: optax AdamW, weight-decay mask, schedule, clipping, accumulation."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from vlm_jax.config import ConfigError

# Parameters that get no weight decay, as in open_clip (`exclude = lambda n, p: p.ndim < 2 or
# "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n`): every parameter with fewer than
# two dimensions (biases, LayerNorm gains, the temperature) plus those named here (the class
# token is stored as [1, 1, width]).
NO_DECAY_PATTERN = r"(^|\.)(bias|scale|cls_token|logit_scale|logit_bias)$"


def path_str(path: tuple) -> str:
    """``('image', 'encoder', 'blocks', 0, 'mlp', 'fc1', 'kernel')`` -> 'image.encoder.blocks.0....'"""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params: Any, no_decay_pattern: str = NO_DECAY_PATTERN) -> Any:
    """True for parameters that get weight decay: ndim >= 2 and not matching the pattern."""
    rx = re.compile(no_decay_pattern)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: len(x.shape) >= 2 and not rx.search(path_str(p)), params)


def is_locked(path: str, locked: tuple[str, ...] = ()) -> bool:
    """Whether the parameter ``path`` ('image.encoder...') lies under one of the ``locked``
    parameter paths ('image', 'image_projection')."""
    return any(path == part or path.startswith(part + ".") for part in locked)


def trainable_mask(params: Any, pattern: str, locked: tuple[str, ...] = ()) -> Any:
    """True for the parameters whose path matches ``pattern`` (``re.search``; all match an
    empty pattern) and does not lie under a ``locked`` part (a family's locked tower,
    ``Family.locked``: LiT's image tower)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"config.optim.trainable={pattern!r} is not a regular expression: "
                          f"{e}.") from e

    def trains(p, _):
        name = path_str(p)
        return (not pattern or bool(rx.search(name))) and not is_locked(name, locked)
    return jax.tree_util.tree_map_with_path(trains, params)


def make_schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warm-up then cosine (or linear / constant) decay."""
    warmup = int(cfg.warmup_steps)
    end = cfg.lr * cfg.end_lr_factor
    if warmup >= total_steps:
        raise ConfigError(f"config.optim.warmup_steps={warmup} must be smaller than "
                          f"config.total_steps={total_steps}.")
    name = cfg.schedule
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total_steps, end)
    if name == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup),
             optax.linear_schedule(cfg.lr, end, total_steps - warmup)], [warmup])
    if name == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
            [warmup])
    raise ConfigError(f"config.optim.schedule={name!r}: use 'cosine', 'linear' or 'constant'.")


def make_optimizer(cfg: ConfigDict, total_steps: int, locked: tuple[str, ...] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay, masked) with global-norm clipping and optional accumulation.

    Config fields (``config.optim``): ``name`` ('adamw'), ``lr``, ``b1``, ``b2``, ``eps``,
    ``weight_decay``, ``warmup_steps``, ``schedule``, ``end_lr_factor``, ``grad_clip_norm``
    (0 = off), ``trainable`` (a regular expression on parameter
    paths such as ``'^(resampler|xattn)\.'``; '' = every parameter trains). Parameters that do
    not match are frozen: ``optax.multi_transform`` gives them ``optax.set_to_zero`` (no
    optimizer state), and the train step stops their gradients (:func:`trainable_mask`). So
    are the parameters under ``locked`` (the paths a family locks whatever the config says,
    ``Family.locked``: LiT's image tower).

    One call of the returned transformation is one update, one train step: the schedule counts
    updates (``total_steps`` and ``warmup_steps`` are updates). Micro-batching
    (``grad_accum_steps``) happens inside the step (:func:`vlm_jax.train.make_loss_and_grads`),
    not here: ``optax.MultiSteps`` would make every k-th call an update, so that a step would
    no longer be an update and the schedule would run k times slower than ``total_steps``. A
    non-finite step is kept out of the state by the train step
    (:func:`vlm_jax.train.make_train_step`).
    """
    if cfg.name != "adamw":
        raise ConfigError(f"config.optim.name={cfg.name!r}: only 'adamw' is available.")
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if cfg.trainable or locked:
        pattern, locked = cfg.trainable, tuple(locked)

        def labels(params):
            return jax.tree.map(lambda t: "train" if t else "frozen",
                                trainable_mask(params, pattern, locked))

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def applied_lr(schedule: optax.Schedule, opt_state: Any) -> jax.Array:
    """The learning rate the next update of ``opt_state`` applies: the schedule at the
    optimizer's own update count (``optax.scale_by_schedule``'s), which a step the guard
    skipped does not advance, rather than at the train step."""
    states = [x for x in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(x, optax.ScaleByScheduleState)]
    return schedule(states[0].count)
