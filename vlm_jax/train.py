"""One training loop for every model: ``(state, batch) -> (state, metrics)`` under ``jax.jit``.

The train state is a plain pytree ``{"step", "params", "opt_state"}`` (params as the pure dict of
the NNX module's state; plus ``"teacher"``, an EMA copy of part of the params, for a family that
distils from one: SigLIP 2) so that optax, orbax and sharding rules all see the same structure. The
NNX module is rebuilt from its graph definition inside the step (``nnx.merge``), which costs
nothing at run time: it happens once, at trace time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config as config_lib
from vlm_jax import data as data_lib
from vlm_jax import evaluation as evaluation_lib
from vlm_jax import metrics as metrics_lib
from vlm_jax import faults, optim, parallel, paths, profiling, runtime
from vlm_jax.config import ConfigError
from vlm_jax.families import Family, get_family

log = logging.getLogger(__name__)

# Config keys whose change makes a checkpoint unusable or silently changes the run on resume.
RESUME_CRITICAL_KEYS = ("model", "batch_size", "seed", "data.name", "data.config_name", "optim")
# The training data: a change is refused too, unless config.checkpoint.allow_data_change (then
# the saved data-iterator position is applied to the new data).
RESUME_DATA_KEYS = ("data.train_files", "data.mixture", "data.tokenizer")


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/Inf (``config.guard``); the last good checkpoint is kept."""


# The errors `vlm-jax train` reports with an exit code (main.py); a process that stops because
# another one met such an error raises the same type and exits with the same code.
STOP_EXIT_CODES = {data_lib.DataError: 2, ConfigError: 2, ckpt_lib.CheckpointError: 2,
                   TrainingDiverged: 3}


@dataclasses.dataclass
class TrainSetup:
    """Everything derived from a config that the train/eval/compile commands share."""

    config: ConfigDict
    mesh: Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any  # ShapeDtypeStructs, with shardings
    state_shardings: Any
    init_fn: Callable[[], Any]
    family: Family  # config.model's family: model, objective, batch spec, data, FLOPs

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global training batch (shapes and dtypes, no sharding): the family's."""
        return self.family.batch_spec(self.config)

    @property
    def param_shardings(self):
        return self.state_shardings["params"]


def setup(config: ConfigDict, mesh: Mesh | None = None) -> TrainSetup:
    """Builds mesh, abstract model/optimizer state and their shardings (no arrays allocated)."""
    mesh = mesh or parallel.create_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.axis_rules)
    try:
        parallel.check_batch_divisible(config.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(f"config.batch_size: {e}") from e
    family = get_family(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps,
                                        locked=family.locked_parts(config))

    def init_fn():
        model = family.build_model(config.model, nnx.Rngs(config.seed))
        params = nnx.state(model).to_pure_dict()
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params)}
        teacher = family.teacher_of(params, config)
        if teacher is not None:  # e.g. SigLIP 2's EMA teacher, a copy of part of the params
            state["teacher"] = jax.tree.map(jnp.copy, teacher)
        return state

    try:
        abstract_model = nnx.eval_shape(
            lambda: family.build_model(config.model, nnx.Rngs(0)))
    except ValueError as e:  # The error names the key; report it as a config error.
        raise ConfigError(f"config.model: {e}") from e
    graphdef, abstract_params = nnx.split(abstract_model)
    param_sh = parallel.state_shardings(abstract_params, mesh, rules)
    abstract = jax.eval_shape(init_fn)
    replicated = NamedSharding(mesh, P())
    masked = optax.transforms._masking.MaskedNode  # pylint: disable=protected-access
    # Frozen parameters (config.optim.trainable) have a MaskedNode, no state, in the optimizer.
    opt_sh = optax.tree_map_params(tx, lambda x, s: x if isinstance(x, masked) else s,
                                   abstract["opt_state"], param_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, masked))
    shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
    teacher_sh = family.teacher_of(param_sh, config)
    if teacher_sh is not None:
        shardings["teacher"] = teacher_sh
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    init = jax.jit(init_fn, out_shardings=shardings)
    return TrainSetup(config, mesh, rules, graphdef, tx, schedule, abstract, shardings, init,
                      family)


def batch_shardings(mesh: Mesh, batch_shapes: dict[str, Any]) -> dict[str, NamedSharding]:
    """Shardings of a global batch (``{key: shape or ShapeDtypeStruct}``): leading dimension
    over the batch axes."""
    return {k: NamedSharding(mesh, parallel.batch_spec(len(getattr(s, "shape", s))))
            for k, s in batch_shapes.items()}


# An objective that averages over a data-dependent count (the LM: target tokens) reports the
# count under this metric; 'gradients' micro-batching weights each micro-batch by it.
COUNT_KEY = "train/target_tokens"


def accumulation(config: ConfigDict, family: Family) -> tuple[int, str]:
    """``(k, mode)``: the micro-batches per step (``config.optim.grad_accum_steps``) and how their
    gradients combine (``config.optim.grad_accum_mode``): ``'embeddings'`` (the contrastive
    objective over the whole batch, every negative kept; families with ``embed`` /
    ``batch_loss``) or ``'gradients'`` (the mean of per-micro-batch objectives).

    Raises:
        ConfigError: an unknown mode, ``'embeddings'`` for a family without the split, or
            ``k < 1``.
    """
    k, mode = int(config.optim.grad_accum_steps), config.optim.grad_accum_mode
    if k < 1:
        raise ConfigError(f"config.optim.grad_accum_steps={k}: the micro-batches per step, >= 1.")
    if mode == "auto":
        mode = "embeddings" if family.contrastive else "gradients"
    if mode not in ("embeddings", "gradients"):
        raise ConfigError(f"config.optim.grad_accum_mode={mode!r}: use 'auto', 'embeddings' or "
                          "'gradients'.")
    if mode == "embeddings" and not family.contrastive:
        raise ConfigError(f"config.optim.grad_accum_mode='embeddings' needs a contrastive family "
                          f"(embed / batch_loss); {family.name!r} has none: use 'gradients'.")
    if mode == "gradients" and k > 1 and family.contrastive:
        log.warning(
            "config.optim.grad_accum_mode='gradients' with %d micro-batches changes the "
            "contrastive objective: each micro-batch of %d sees only its own negatives, not the "
            "batch's %d. grad_accum_mode='embeddings' computes the batch's loss exactly.",
            k, config.batch_size // k, config.batch_size)
    return k, mode


def _after(acc: Any, xs: Any) -> tuple[Any, Any]:
    """``(acc, xs)`` unchanged, but ``xs`` usable only once ``acc`` is computed: a micro-batch
    loop's body starts its micro-batch after the previous one's gradients are accumulated.

    XLA unrolls short loops (two micro-batches, on TPU) and may then schedule the next
    micro-batch's forward pass before the previous one's backward pass, keeping the activations
    of both alive (measured with ``vlm-jax compile``: clip_tiny.py:test at 256 images per
    v5e chip in two micro-batches of 128, 55 MiB of temporaries without this, 10 MiB with it;
    in one micro-batch, 9 MiB).
    """
    return jax.lax.optimization_barrier((acc, xs))


def make_loss_and_grads(s: TrainSetup) -> Callable:
    """``fn(params, batch) -> (loss, metrics, grads)`` of the family's objective on a global
    batch, in ``config.optim.grad_accum_steps`` micro-batches (to be called inside ``jit``).

    * ``k = 1``: one forward and backward pass over the whole batch.
    * ``'embeddings'`` (contrastive families; gradient caching, Gao et al. 2021, as open_clip's
      ``--accum-freq``): (1) every micro-batch is embedded with no activations kept; (2) the
      loss over all ``B`` embeddings (any ``loss.variant``) and its gradient with respect to
      them and to the loss's own parameters (temperature, bias); (3) each micro-batch's
      forward pass again, back-propagated with its slice of the embedding gradients (plus its
      local term, CoCa's captioning loss), parameter gradients summed. Loss and gradients
      equal the full batch's; activations are those of one micro-batch, at the price of a
      second forward pass (4/3 of the FLOPs).
    * ``'gradients'``: the mean of the micro-batches' objectives and gradients, weighted by the
      count an objective averages over when it reports one (``metrics[COUNT_KEY]``, the LM's
      target tokens), so that it equals the full batch for objectives that are means over
      examples or tokens; for a contrastive loss it is another objective (each micro-batch sees
      ``B / k`` negatives).

    Micro-batch ``j`` takes rows ``[j b / k, (j + 1) b / k)`` of every batch shard's ``b`` rows
    (:func:`vlm_jax.parallel.split_microbatches`): no data moves between devices.
    """
    config, mesh, rules, family = s.config, s.mesh, s.rules, s.family
    k, mode = accumulation(config, family)
    rows = config.batch_size // parallel.batch_shard_count(mesh)
    if rows % k:
        raise ConfigError(
            f"config.optim.grad_accum_steps={k} does not divide the {rows} rows of each of the "
            f"{parallel.batch_shard_count(mesh)} batch shards (config.batch_size="
            f"{config.batch_size}): choose a divisor of {rows}.")
    nan_step = faults.nan_loss_step()  # Reliability battery only; None otherwise.
    trainable, locked = config.optim.trainable, family.locked_parts(config)

    def model_of(params):
        if trainable or locked:  # Frozen parameters: no weight gradients are computed at all.
            params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                                  optim.trainable_mask(params, trainable, locked))
        return nnx.merge(s.graphdef, params)

    def objective(params, batch, scale, ctx=None):
        with parallel.sharding_context(mesh, rules):
            if ctx is None:
                loss, aux = family.objective(model_of(params), batch, config, mesh)
            else:  # A family with a teacher: ctx = {'step', 'teacher'}.
                loss, aux = family.objective(model_of(params), batch, config, mesh, ctx=ctx)
        return (loss if scale is None else loss * scale), aux

    if family.teacher_of(s.abstract_state["params"], config) is not None and k > 1:
        raise ConfigError(f"config.optim.grad_accum_steps={k}: the teacher-based objective "
                          "(SigLIP 2's self-supervised terms) is computed on whole batches; "
                          "set grad_accum_steps=1.")
    if k == 1:
        def whole(params, batch, scale=None, ctx=None):
            (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, batch,
                                                                              scale, ctx)
            return loss, aux, grads
        fn = whole
    elif mode == "gradients":
        def plain(params, batch, scale=None):
            def body(acc, micro):
                acc, micro = _after(acc, micro)
                (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, micro,
                                                                                  scale)
                w = (aux[COUNT_KEY] if COUNT_KEY in aux else 1.0) * jnp.ones((), jnp.float32)
                return jax.tree.map(lambda a_, g: a_ + w * g, acc, grads), (loss, aux, w)

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (losses_, aux, w) = jax.lax.scan(
                body, zeros, parallel.split_microbatches(batch, k, mesh))
            total = jnp.sum(w)
            mean = lambda x: jnp.tensordot(w, x, axes=1) / total  # noqa: E731
            aux = jax.tree.map(mean, aux)
            if COUNT_KEY in aux:
                aux[COUNT_KEY] = total
            return mean(losses_), aux, jax.tree.map(lambda g: g / total, grads)
        fn = plain
    else:
        def embed(params, micro):
            with parallel.sharding_context(mesh, rules):
                return family.embed(model_of(params), micro, config)

        def cached(params, batch, scale=None):
            micros = parallel.split_microbatches(batch, k, mesh)
            # (1) Embeddings of every micro-batch; lax.map keeps no activations for a backward.
            emb = jax.lax.map(lambda micro: embed(params, micro)[0], micros)
            emb = parallel.merge_microbatches(emb, mesh)

            # (2) The loss over the whole batch: gradients for the embeddings and for the
            # parameters the loss itself reads (temperature, bias).
            def loss_of(p, e):
                with parallel.sharding_context(mesh, rules):
                    loss, aux = family.batch_loss(model_of(p), e, config, mesh)
                return (loss if scale is None else loss * scale), aux

            (loss, aux), (g_loss, g_emb) = jax.value_and_grad(
                loss_of, argnums=(0, 1), has_aux=True)(params, emb)
            g_emb = parallel.split_microbatches(g_emb, k, mesh)

            # (3) Each micro-batch again, back-propagated with its slice of the embedding
            # gradients (and its local term's, weighted 1/k: the local terms are averaged).
            def body(acc, xs):
                acc, (micro, g) = _after(acc, xs)

                def surrogate(p):
                    e, local, local_aux = embed(p, micro)
                    dot = sum(jnp.vdot(e[key], g[key].astype(e[key].dtype)) for key in e)
                    return dot + local / k, (local, local_aux)

                grads, (local, local_aux) = jax.grad(surrogate, has_aux=True)(params)
                return jax.tree.map(jnp.add, acc, grads), (local, local_aux)

            grads, (local, local_aux) = jax.lax.scan(body, g_loss, (micros, g_emb))
            mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
            return (loss + mean(local), {**aux, **jax.tree.map(mean, local_aux)}, grads)
        fn = cached

    if nan_step is None:
        return fn

    def poisoned(params, batch, step, ctx=None):
        # The loss scaled by NaN at the armed step, inside the differentiated function, so that
        # the gradients are NaN too and the other steps' arithmetic is that of an unarmed run.
        kw = {} if ctx is None else {"ctx": ctx}
        return fn(params, batch, jnp.where(step + 1 == nan_step, jnp.nan, 1.0), **kw)
    return poisoned


def make_train_step(s: TrainSetup, batch_spec: dict[str, Any] | None = None) -> Callable:
    """The jitted train step with explicit in/out shardings and the state donated: one optimizer
    update on one global batch of ``config.batch_size`` examples (in
    ``optim.grad_accum_steps`` micro-batches, :func:`make_loss_and_grads`).

    ``batch_spec``: ``{key: ShapeDtypeStruct or shape}`` of the global batch; default (what
    ``train`` and ``compile`` use) the family's :meth:`TrainSetup.batch_spec`."""
    config, mesh = s.config, s.mesh
    batch_spec = s.batch_spec() if batch_spec is None else batch_spec
    loss_and_grads = make_loss_and_grads(s)
    poisoned = faults.nan_loss_step() is not None
    after_update = s.family.after_update

    def train_step(state, batch):
        # A family's EMA teacher (SigLIP 2): the objective reads it and the step.
        kw = ({"ctx": {"step": state["step"], "teacher": state["teacher"]}}
              if "teacher" in state else {})
        if poisoned:
            loss, aux, grads = loss_and_grads(state["params"], batch, state["step"], **kw)
        else:
            loss, aux, grads = loss_and_grads(state["params"], batch, **kw)
        # Named scopes label the compiled ops for profiles (benchmarks/step_profile.py).
        with jax.named_scope("optimizer"):
            updates, opt_state = s.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            if after_update is not None:  # e.g. CLIP's temperature clamped, as open_clip
                params = after_update(params, config)
        with jax.named_scope("guard"):
            grad_norm = optax.global_norm(grads)
        # A step with a NaN/Inf loss or gradient leaves params and optimizer state as they were
        # (the loop then stops or skips, config.guard). A select rather than
        # optax.apply_if_finite: that wraps the update in lax.cond, which compiles it apart from
        # the rest of the step; its values then differ in the 7th digit from the first step and
        # the quickstart's trajectory drifts (72.3 -> 69.5 % zero-shot top-1 after 1200 steps).
        # The select leaves the update's arithmetic as it is (same losses, bit for bit).
        with jax.named_scope("guard"):
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                             (params, opt_state),
                                             (state["params"], state["opt_state"]))
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
                   "train/lr": optim.applied_lr(s.schedule, state["opt_state"]), **aux}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if "teacher" in state:  # After the guard: a skipped step leaves the teacher as it was.
            with jax.named_scope("teacher_ema"):
                teacher = s.family.update_teacher(state["teacher"], params, state["step"],
                                                  config)
                new_state["teacher"] = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                                    teacher, state["teacher"])
        return new_state, metrics

    return jax.jit(train_step,
                   in_shardings=(s.state_shardings, batch_shardings(mesh, batch_spec)),
                   out_shardings=(s.state_shardings, NamedSharding(mesh, P())),
                   donate_argnums=(0,))


# -------------------------------------------------------------------------------------------
# Evaluation.
# -------------------------------------------------------------------------------------------


def make_evaluation(config: ConfigDict, data, names=None) -> evaluation_lib.Evaluation:
    """The run's :class:`~vlm_jax.evaluation.Evaluation` (entries of ``config.evals``, or those
    ``names``), for the model of ``config``."""
    family = get_family(config)
    return evaluation_lib.Evaluation(config, data, capabilities=family.capabilities,
                                     image_size=family.image_size(config), names=names,
                                     defaults=family.default_evals(config))


def evaluate(s: TrainSetup, params, evaluation: evaluation_lib.Evaluation,
             entries=None) -> dict[str, float]:
    """Runs ``entries`` (default: all) of ``evaluation``; keys ``<entry name>/<metric>``.

    The evaluation keeps one feature extractor for the run: the jitted functions are compiled
    at the first call and reused after."""
    return evaluation.run(s, params, entries)


def check_eval_data(config: ConfigDict, data, names=None) -> evaluation_lib.Evaluation:
    """Checks, when a run or ``vlm-jax eval`` starts, that every entry of ``config.evals`` (or
    those ``names``) can run on its dataset and on the model, from the datasets' metadata (TFDS
    features and splits) without reading or decoding an example: a misfit is reported before
    step 0, not at the first evaluation. Returns the run's evaluation.

    Raises:
        ConfigError: an entry does not fit its data or the model (naming config.evals.<name>).
        DataError: a dataset or a split an entry reads is not prepared.
    """
    evaluation = make_evaluation(config, data, names)
    evaluation.check()
    return evaluation


def write_eval_results(workdir: epath.Path, evaluation: evaluation_lib.Evaluation, step: int,
                       results: dict[str, float]) -> list[epath.Path]:
    """Writes ``eval_results_<split>.json`` per dataset and split (CLIP_benchmark field names
    dataset, model, task, metrics; plus entry, split, step), prints markdown tables; see
    :func:`vlm_jax.evaluation.write_results`."""
    return evaluation_lib.write_results(workdir, evaluation.config, evaluation.entries, step,
                                        results)


# -------------------------------------------------------------------------------------------
# Training.
# -------------------------------------------------------------------------------------------


def check_batch(local: dict, spec: dict[str, jax.ShapeDtypeStruct], process_count: int
                ) -> None:
    """Checks a process's batch from the pipeline against the global ``spec`` the step was
    compiled for (``process_count`` equal shares of the leading dimension), before step 0.

    Raises:
        DataError: a key is missing or has another shape or dtype (both named).
    """
    for key, want in spec.items():
        shape = (want.shape[0] // process_count, *want.shape[1:])
        got = local.get(key)
        if got is None:
            raise data_lib.DataError(f"The training pipeline's batch has no {key!r} (it has "
                                     f"{sorted(local)}); the model's family expects {key} "
                                     f"{want.dtype} {list(want.shape)} (global).")
        if tuple(got.shape) != shape or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise data_lib.DataError(
                f"The training pipeline ships {key!r} as {np.dtype(got.dtype)} "
                f"{list(got.shape)} per process; the train step is compiled for "
                f"{np.dtype(want.dtype)} {list(shape)} ({list(want.shape)} over "
                f"{process_count} process(es)). Check config.data and the model's image size / "
                "context length.")


def _check_workdir(workdir: epath.Path) -> None:
    problem = paths.remote_problem(workdir)  # gs://: endpoint reachable, bucket exists.
    if problem:
        raise ConfigError(f"--workdir {problem}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{jax.process_index()}"  # One per process: no race.
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable ({e}); choose another directory.") \
            from e


def _check_resume_config(saved: dict | None, config_json: dict, workdir: epath.Path) -> None:
    """Refuses to resume when the config differs from the checkpoint's in
    :data:`RESUME_CRITICAL_KEYS` or, unless ``checkpoint.allow_data_change``, in
    :data:`RESUME_DATA_KEYS`; notes a changed ``total_steps``. A key the saved config lacks
    (added to the base config since) counts at its default, as the run used it."""
    if not saved:
        return
    diffs = config_lib.diff(config_lib.fill_defaults(saved), config_json)

    def under(keys):
        return [d for d in diffs if any(d[0] == k or d[0].startswith(k + ".") for k in keys)]

    changed, data_changed = under(RESUME_CRITICAL_KEYS), under(RESUME_DATA_KEYS)
    allow_data = bool(config_json["checkpoint"]["allow_data_change"])
    is_main = jax.process_index() == 0
    schedule = [d for d in diffs if d[0] == "total_steps"]
    if schedule and is_main:  # Allowed (extending a run), but not silently.
        print(f"Note: total_steps changed since the checkpoints were written ({schedule[0][1]} "
              f"-> {schedule[0][2]}): the learning-rate schedule changes from here on.")
    if data_changed and allow_data and not changed and is_main:
        for k, a, b in data_changed:
            print(f"Note: {k} changed since the checkpoints were written ({a!r} -> {b!r}); "
                  "resuming on the new data (config.checkpoint.allow_data_change=True).")
    if changed or (data_changed and not allow_data):
        refused = changed + ([] if allow_data else data_changed)
        lines = "\n".join(f"  {k}: checkpoint {a!r} -> now {b!r}" for k, a, b in refused[:10])
        override = ("" if allow_data or not data_changed else
                    f"\nTo continue this run on other training data on purpose ("
                    f"{', '.join(k for k, _, _ in data_changed)}), set "
                    "--config.checkpoint.allow_data_change=True: the saved data-iterator "
                    "position is then applied to the new data.")
        raise ConfigError(
            f"The config differs from the one that wrote the checkpoints in {workdir} in keys "
            f"that break resume:\n{lines}\nUse a new --workdir, or the original values."
            + override)


def _guard_config(config: ConfigDict) -> dict:
    guard = dict(config.guard)
    if guard["nonfinite"] not in ("stop", "skip"):
        raise ConfigError(f"config.guard.nonfinite={guard['nonfinite']!r}: use 'stop' (end the "
                          "run, keeping the last good checkpoint) or 'skip' (drop the step).")
    return guard


def _state_bytes(abstract_state) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(abstract_state))


class _StepChecker:
    """Checks the per-step loss and gradient norm for NaN/Inf (``config.guard``).

    The metrics of each step stay on the device until a log step, a checkpoint or the end of the
    run; then they are fetched together (one host transfer) and checked step by step, so a bad
    step is named exactly and nothing that follows it is saved.
    """

    def __init__(self, guard: dict, workdir: epath.Path, progress: "_Progress"):
        self.guard, self.workdir, self.progress = guard, workdir, progress
        self.pending: list[tuple[int, Any]] = []
        self.skipped = 0
        self.in_a_row = 0

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, {k: metrics[k] for k in ("train/loss", "train/grad_norm")}))

    def check(self, last_saved: int | None) -> None:
        """Raises TrainingDiverged at the first bad step (stop) or too many in a row (skip)."""
        pending, self.pending = jax.device_get(self.pending), []
        for step, m in pending:
            bad = [f"{k}={float(m[k])}" for k in ("train/loss", "train/grad_norm")
                   if not np.isfinite(m[k])]
            if not bad:
                self.in_a_row = 0
                continue
            where = (f"the last good checkpoint, step {last_saved}, is kept in "
                     f"{self.workdir / 'checkpoints'}" if last_saved is not None else
                     "no checkpoint had been written yet")
            if self.guard["nonfinite"] == "stop":
                raise TrainingDiverged(
                    f"Non-finite {', '.join(bad)} at step {step}; the run stops "
                    f"(config.guard.nonfinite='stop') and {where}. Lower config.optim.lr, enable "
                    "config.optim.grad_clip_norm, or set config.guard.nonfinite=skip.")
            self.skipped += 1
            self.in_a_row += 1
            self.progress.write(f"step {step}: non-finite {', '.join(bad)}; update skipped "
                                f"(config.guard.nonfinite='skip'; {self.skipped} skipped so far)")
            if self.in_a_row > self.guard["max_consecutive_skips"]:
                raise TrainingDiverged(
                    f"{self.in_a_row} steps in a row up to step {step} had non-finite "
                    f"{', '.join(bad)} (more than config.guard.max_consecutive_skips="
                    f"{self.guard['max_consecutive_skips']}); {where}.")


def _compile_then_meet(step_fn, state, batch):
    """Multi-process runs: compiles the train step, then waits for every process before its
    first execution, so that all reach the first collective together. Otherwise a process whose
    compile is slower (a busy host, a cold compilation cache) arrives late: the CPU backend's
    gloo transport gives up connecting after its fixed timeout ("Gloo context initialization
    failed: Connect timeout"), and accelerator hosts wait idle inside the collective."""
    compiled = step_fn.lower(state, batch).compile()
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    client = distributed.global_state.client
    if client is not None:  # The coordination service's barrier: no device collective.
        client.wait_at_barrier("vlm_jax_train_step_compiled", 60 * 60 * 1000)
    return compiled


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Every check that can fail without compute runs first: workdir writable, free disk space for a
    checkpoint, the saved config and parameter shapes compatible with this config. On SIGTERM
    (preemption) every process saves the same step and the function returns
    ``{'preempted_at_step': step}``; run the same command to resume. Otherwise returns the final
    evaluation metrics.
    """
    workdir = epath.Path(workdir)
    _check_workdir(workdir)
    guard = _guard_config(config)
    profiler = profiling.StepProfiler(config, workdir)  # config.profile: trace a step range.
    s = setup(config)
    is_main = jax.process_index() == 0
    faults.install_kill_in_save()  # Reliability battery only; no-op otherwise.
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints",
                                 save_every_steps=config.checkpoint.every_steps,
                                 keep=config.checkpoint.keep,
                                 keep_every_steps=config.checkpoint.keep_every_steps,
                                 async_save=config.checkpoint.async_save)
    config_json = json.loads(config_lib.to_json(config))
    latest = ckpt.latest_step()
    try:
        if latest is not None:
            _check_resume_config(ckpt.saved_config(latest), config_json, workdir)
            ckpt.check_shapes(latest, s.abstract_state)
        state_bytes = _state_bytes(s.abstract_state)
        ckpt_lib.check_free_space(ckpt.directory, int(1.1 * state_bytes) + 2**24,
                                  f"a checkpoint of {state_bytes / 2**20:.1f} MiB")
    except Exception:
        ckpt.close()  # Stop orbax's background threads: the error is the last word printed.
        raise

    data = s.family.make_data(config)
    try:  # From metadata: a misfit stops the run before step 0.
        evaluation = check_eval_data(config, data)
    except Exception:
        ckpt.close()
        raise
    train_iter = data.train_iterator()

    if latest is not None:
        state = ckpt.restore(latest, s.abstract_state, data_iter=train_iter)
        log.info("Resumed from step %d in %s", latest, workdir)
        if is_main:
            print(f"Resuming from checkpoint step {latest} in {workdir / 'checkpoints'}")
    else:
        state = s.init_fn()
        if config.init_from:
            state["params"] = load_pretrained(config, s, state["params"])
    if is_main:
        (workdir / "config.json").write_text(config_lib.to_json(config))
        data_lib.save_tokenizer(workdir, data.tokenizer)  # The workdir serves inference alone.
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_state["params"]))
        print(f"Model {s.family.name}: {n_params / 1e6:.2f}M parameters; mesh "
              f"{dict(s.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
              f"{jax.process_count()} process(es); global batch {config.batch_size}.")

    batch_spec = s.batch_spec()  # What the step is compiled for and the pipeline must ship.
    train_step = make_train_step(s, batch_spec)
    writer = metrics_lib.MetricWriter(workdir)
    flops_per_example = s.family.train_flops_per_example(config)
    total = config.total_steps
    start = int(state["step"])
    progress = _Progress(start, total, enabled=is_main)
    checker = _StepChecker(guard, workdir, progress)
    preemption = ckpt_lib.PreemptionWatcher()
    # An error one process meets (a DataError from its shards, an evaluator failing) stops every
    # process with the same error, instead of leaving them in the next collective.
    agreement = runtime.StopAgreement(STOP_EXIT_CODES)
    results: dict[str, float] = {}
    t0, t0_step = time.perf_counter(), start
    try:
        for step in range(start, total):
            agreement.check()
            faults.maybe_fail("data_error", step + 1)  # Reliability tests only.
            local = next(train_iter)
            if step == start:
                check_batch(local, batch_spec, jax.process_count())
            batch = parallel.make_global_batch({k: local[k] for k in batch_spec}, s.mesh)
            if step == start and jax.process_count() > 1:
                train_step = _compile_then_meet(train_step, state, batch)
            profiler.before_step(step + 1)
            state, metrics = train_step(state, batch)
            done = step + 1
            profiler.after_step(done, metrics)
            checker.add(done, metrics)
            preempted = preemption.reached(done)
            log_now = done % config.log_every_steps == 0 or done == total
            save_now = done == total or preempted or ckpt.manager.should_save(done)
            if log_now or save_now:
                checker.check(ckpt.latest_step())  # Nothing after a bad step is saved.
            if log_now:
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                if done - t0_step > 0 and step > start:  # Exclude the compile of the first step.
                    ips = (done - t0_step) * config.batch_size / dt
                    metrics["perf/images_per_sec"] = ips
                    metrics["perf/tflops_per_device"] = (
                        3 * flops_per_example * ips / jax.device_count() / 1e12)
                t0, t0_step = time.perf_counter(), done
                if checker.skipped:
                    metrics["train/skipped_steps"] = checker.skipped
                if data.source is not None:  # Raw shards: bad samples skipped so far, by reason,
                    stats = data_lib.global_skip_stats()  # of all processes: the same decision.
                    metrics.update({f"data/{k}": v for k, v in stats.items() if k != "seen"})
                    data_lib.check_skipped(stats, config)
                writer.write(done, metrics)
                progress.update(done, metrics)
            if save_now:
                ckpt.save(done, state, data_iter=train_iter, config=config_json,
                          force=done == total or preempted)
            if preempted:
                ckpt.wait()
                progress.close()
                if is_main:
                    print(f"Preempted ({preemption.signal_name}) at step {done}: checkpoint "
                          f"saved in {ckpt.directory / str(done)}. Run the same command to "
                          "resume from it.")
                ckpt.close()
                writer.close()
                return {"preempted_at_step": done}
            due = evaluation.due(done, total)  # Every entry at the end of training.
            if due:
                faults.maybe_fail("eval_error", done)  # Reliability tests only.
                results = evaluate(s, state["params"], evaluation, due)
                agreement.check()
                writer.write(done, {f"eval/{k}": v for k, v in results.items()})
                progress.write(f"step {done}: " + ", ".join(f"{k}={v:.3f}" for k, v in
                                                           results.items()))
        if start >= total and evaluation.entries:  # Training was complete: evaluate the end.
            results = evaluate(s, state["params"], evaluation)
            writer.write(total, {f"eval/{k}": v for k, v in results.items()})
        agreement.check()
        progress.close()
        ckpt.close()
    except Exception as e:
        if ckpt_lib.is_disk_full(e):
            error = ckpt_lib.CheckpointError(
                f"Disk full while writing to {workdir} ({e}). The complete checkpoints are "
                f"intact (latest: step {ckpt.latest_step()}); free space and run the same "
                "command to resume.")
            raise agreement.announce(error) from e
        agreed = agreement.announce(e)  # The others stop too, with the same error.
        try:  # Commit the saves still in flight: they hold states from before the failure.
            ckpt.wait()
        except Exception:  # pylint: disable=broad-except
            log.exception("A checkpoint save in flight failed while stopping.")
        if agreed is not e:
            raise agreed from e
        raise
    finally:
        preemption.close()
        profiler.close()
        agreement.close()
    results_files = write_eval_results(workdir, evaluation, total, results) if results else []
    writer.close()
    plot = metrics_lib.plot_metrics(workdir)
    if is_main and plot:
        print(f"Wrote {plot}, {workdir / 'metrics.jsonl'}, "
              + "".join(f"{f}, " for f in results_files)
              + f"and checkpoints in {workdir / 'checkpoints'}.")
    return results


def load_pretrained(config: ConfigDict, s: TrainSetup, params: dict) -> dict:
    """Replaces parts of freshly initialised ``params`` by those of trained runs.

    ``config.init_from``: ``{target: {'workdir': <run>, 'subtree': <path in that run's params>,
    'step': <step or None = latest>}}``, e.g. Flamingo's ``vision`` from a CLIP run's ``image``
    tower and ``lm`` from a language-model run (``subtree`` '' = all its parameters), or LiT's
    locked ``image`` from a ``vlm-jax convert`` output (a workdir with ``config.json`` and a
    parameters-only ``checkpoints/0``). The source run's ``config.json`` builds its model;
    shapes must match the target's exactly.

    Raises CheckpointError naming the run when it has no checkpoint or the shapes differ.
    """
    params = dict(params)
    for target, spec in config.init_from.items():
        spec = dict(spec)
        workdir = epath.Path(spec["workdir"])
        problem = paths.remote_problem(workdir)
        if problem:
            raise ckpt_lib.CheckpointError(f"config.init_from.{target}.workdir: {problem}")
        if not (workdir / "config.json").exists():
            raise ckpt_lib.CheckpointError(
                f"config.init_from.{target}.workdir={workdir} has no config.json: train that run "
                "first (see the config file's docstring for the command) or point to it.")
        source_config = config_lib.load_json_config(str(workdir / "config.json"))
        _, source, step = restore_for_inference(source_config, workdir, spec.get("step"))
        for key in filter(None, str(spec.get("subtree", "")).split(".")):
            if key not in source:
                raise ckpt_lib.CheckpointError(
                    f"config.init_from.{target}.subtree: {workdir} (model "
                    f"{get_family(source_config).name}) has no parameters {key!r}; it has "
                    f"{sorted(source)}.")
            source = source[key]
        if target not in params:
            raise ConfigError(f"config.init_from: the model has no parameters {target!r}; it has "
                              f"{sorted(params)}.")
        want = jax.tree_util.tree_flatten_with_path(params[target])[0]
        got = dict(jax.tree_util.tree_flatten_with_path(source)[0])
        bad = [f"{optim.path_str(p)}: {getattr(got.get(p), 'shape', 'missing')} vs {x.shape}"
               for p, x in want if getattr(got.get(p), "shape", None) != x.shape]
        if bad or len(got) != len(want):
            raise ckpt_lib.CheckpointError(
                f"config.init_from.{target}: the parameters of {workdir} (step {step}) do not "
                f"fit config.model's {target!r}: " + "; ".join(bad[:5])
                + f" ({len(got)} arrays vs {len(want)}). Make config.model.{target} match the "
                "source run's model config.")
        shardings = s.param_shardings[target]
        params[target] = jax.tree.map(lambda x, sh: jax.device_put(x, sh), source, shardings)
        if jax.process_index() == 0:
            print(f"Initialised {target!r} from {workdir} step {step}"
                  + (f" ({spec['subtree']})" if spec.get("subtree") else ""))
    return params


def restore_for_inference(config: ConfigDict, workdir: str | epath.Path,
                          step: int | None = None) -> tuple[TrainSetup, Any, int]:
    """``(setup, params, step)`` of a workdir's checkpoint (latest by default), parameters only,
    on the current devices; for ``eval`` and ``caption``.

    Raises CheckpointError naming the directory when there is no checkpoint.
    """
    ckpt, step = _open_checkpoint(epath.Path(workdir), step)
    try:
        return _restore_params(config, ckpt, step)
    finally:
        ckpt.close()


def _open_checkpoint(workdir: epath.Path, step: int | None
                     ) -> tuple[ckpt_lib.Checkpointer, int]:
    """The checkpoints of ``workdir`` opened for reading, and ``step`` (default: the latest).

    Raises CheckpointError naming the directory if it holds no checkpoint, and (in seconds, not
    after the storage clients' retries) when a gs:// endpoint does not answer or the bucket is
    missing."""
    problem = paths.remote_problem(workdir)
    if problem:
        raise ckpt_lib.CheckpointError(problem)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every_steps=1, keep=10**6,
                                 async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        ckpt.close()
        raise ckpt_lib.CheckpointError(
            f"No checkpoint found in {workdir / 'checkpoints'}; train first with "
            f"`vlm-jax train --workdir {workdir}` or pass the workdir of a trained run.")
    return ckpt, step


def _restore_params(config: ConfigDict, ckpt: ckpt_lib.Checkpointer, step: int
                    ) -> tuple[TrainSetup, Any, int]:
    s = setup(config)
    return s, ckpt.restore_params(step, s.abstract_state["params"]), step


def evaluate_checkpoint(config: ConfigDict, workdir: str, step: int | None = None,
                        names=None) -> dict[str, float]:
    """Restores a workdir's checkpoint (latest by default) and runs the entries of
    ``config.evals`` (or those ``names``, e.g. ``vlm-jax eval --evaluators``).

    The entries are checked against their datasets' metadata before the checkpoint is read
    (after finding it: an empty workdir is reported without preparing any data)."""
    ckpt, step = _open_checkpoint(epath.Path(workdir), step)
    try:
        data = get_family(config).make_data(config, for_eval=True)
        evaluation = check_eval_data(config, data, names)
        s, params, step = _restore_params(config, ckpt, step)
    finally:
        ckpt.close()
    results = evaluate(s, params, evaluation)
    write_eval_results(epath.Path(workdir), evaluation, step, results)
    return results


class _Progress:
    """tqdm progress bar with loss, images/s and ETA (process 0 only)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm  # pylint: disable=import-outside-toplevel

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self.last = start

    def update(self, step: int, metrics: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.last)
        self.last = step
        post = {"loss": f"{metrics['train/loss']:.3f}"}
        if "perf/images_per_sec" in metrics:
            post["img/s"] = f"{metrics['perf/images_per_sec']:.0f}"
        self.bar.set_postfix(post, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
