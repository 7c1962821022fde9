"""Linear evaluations of frozen image features: few-shot ridge probe and full logistic probe.

Two protocols, both on the L2-normalised image embeddings of ``extractor.images``:

**Few-shot ridge regression** (big_vision ``evaluators/fewshot_lsr.py``, the "10-shot linear"
numbers of ViT / LiT / SigLIP papers). For ``k`` shots, ``k`` training examples per class are
drawn with a seeded RNG (one permutation per class, so the 5-shot set contains the 1-shot set,
as in big_vision). Features are whitened per dimension with the mean and standard deviation
(``+ 1e-5``) of those few-shot examples, a constant feature ``100`` is appended (a bias that the
penalty barely touches), targets are the one-hot labels mapped to {-1, +1}, and
``W = (X^T X + l2 I)^-1 X^T Y`` is solved in closed form. One eigendecomposition of the Gram
matrix (``X^T X`` when N >= D, else ``X X^T`` and ``W = X^T (X X^T + l2 I)^-1 Y``) gives the
solution for every ``l2`` in the grid. big_vision uses a fixed ``l2``; here the ``l2`` with the
best validation top-1 is chosen from a grid (ties: the first in grid order) and the test top-1
is reported at that ``l2``. Computed in float64 numpy: the problem is at most a few thousand
rows, and numpy avoids a recompilation per shot count (big_vision jits on the CPU in float32).

**Full linear probe** (CLIP paper, Radford et al. 2021, appendix A.3): multinomial logistic
regression on all training features, L-BFGS, L2 penalty chosen on a validation split. The
objective is

    mean_i CE(x_i W + b, y_i) + weight_decay / 2 * ||W||_F^2        (bias not penalised)

which is scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))`` that CLIP used. It is
minimised with ``optax.lbfgs`` (zoom line search), full batch, float32, jit-compiled on the CPU
device (not the accelerator: default TPU matmul precision is bfloat16), from zero weights, until
the gradient norm falls below ``tol`` or ``max_iter`` iterations. Each weight decay of the grid
is fitted by the same compiled function; the one with the best validation top-1 (ties: first in
grid order) gives the reported test top-1, top-5 (when there are >= 5 classes) and mean
per-class recall.

``evaluate(extractor, tokenizer, data, **options)`` runs both (see its docstring for ``data``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.evaluators.common import FeatureExtractor
from vlm_jax.evaluators.zeroshot import mean_per_class_recall, topk_accuracy

SHOTS = (1, 5, 10, 25)
# big_vision's few-shot configs use l2_reg = 2**10; this grid brackets it widely.
L2_REGS = tuple(2.0 ** k for k in range(-10, 20, 2))
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MAX_ITER = 1000  # CLIP's probes: scikit-learn LogisticRegression(max_iter=1000).
TOL = 1e-6
BIAS_CONSTANT = 100.0  # big_vision's constant bias feature.


# -------------------------------------------------------------------------------------------
# Shared helpers.
# -------------------------------------------------------------------------------------------


def _check_xy(name: str, x, y, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{name}: expected features [N, D] and labels [N], got shapes "
                         f"{x.shape} and {y.shape}.")
    if len(y) == 0:
        raise ValueError(f"{name}: no examples; provide a non-empty split.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or inf; check the model's outputs.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name}: labels must be integers in [0, num_classes={num_classes}); "
                         f"got dtype {y.dtype}, range [{y.min()}, {y.max()}]. Set num_classes "
                         f"(or data['class_names']) to cover every label.")
    return x, y


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           num_classes: int) -> dict[str, float]:
    """``acc1``, ``acc5`` (only when ``num_classes >= 5``) and ``mean_per_class_recall``.

    Mean per-class recall averages, over the classes present in ``labels``, the fraction of that
    class's examples whose arg-max prediction is the class.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    out = {"acc1": topk_accuracy(logits, labels, 1)}
    if num_classes >= 5:
        out["acc5"] = topk_accuracy(logits, labels, 5)
    out["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(1), labels, num_classes)
    return out


def stratified_split(labels: np.ndarray, *, fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded class-stratified split: ``(train_idx, val_idx)``, both sorted.

    Each class contributes ``round(fraction * n_c)`` of its ``n_c`` examples to validation, but
    always keeps at least one in training (a class with a single example is not validated on).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction}: the validation fraction must be in (0, 1).")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[:min(round(fraction * len(idx)), len(idx) - 1)])
    val = np.sort(np.concatenate([np.zeros(0, np.int64), *val])).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def _choose(val_accs: Sequence[float]) -> int:
    """Index of the best validation accuracy; ties go to the first in grid order."""
    return int(np.argmax(np.asarray(val_accs)))


# -------------------------------------------------------------------------------------------
# Few-shot ridge regression (big_vision).
# -------------------------------------------------------------------------------------------


def fewshot_indices(labels: np.ndarray, shots: int, *, num_classes: int,
                    seed: int = 0) -> np.ndarray:
    """Indices of ``shots`` examples of each class ``0..num_classes-1``, grouped by class.

    Each class's indices are permuted by ``np.random.default_rng(seed)`` (classes in order) and
    the first ``shots`` taken, as big_vision does: the same seed gives the same draw, and the
    ``k``-shot set of a seed contains its ``j``-shot set for ``j < k``.

    Raises:
      ValueError: a class has fewer than ``shots`` examples (naming the class and its count).
    """
    labels = np.asarray(labels)
    if shots < 1:
        raise ValueError(f"shots={shots}: the number of examples per class must be >= 1.")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < shots:
            raise ValueError(
                f"{shots}-shot probe: class {c} has only {len(idx)} training example(s). Remove "
                f"{shots} from the `shots` option or provide at least {shots} examples of every "
                f"class in data['probe_train'].")
        out.append(idx[:shots])
    return np.concatenate(out)


def ridge_precompute(x: np.ndarray, y: np.ndarray, *, num_classes: int) -> dict[str, np.ndarray]:
    """Caches what ridge solutions for any ``l2`` need (big_vision ``_precompute_cache``).

    ``x`` [N, D] is whitened with its own per-dimension mean and std (+1e-5), a constant column
    ``BIAS_CONSTANT`` is appended, and targets are ``2 * one_hot(y) - 1``. With ``X`` [N, D+1]
    that matrix, ``W(l2) = lhs @ diag(1 / (eigs + l2)) @ rhs``: for N >= D+1 the
    eigendecomposition ``X^T X = q diag(eigs) q^T`` gives ``lhs = q, rhs = q^T X^T Y``; otherwise
    ``X X^T = q diag(eigs) q^T`` gives ``lhs = X^T q, rhs = q^T Y``. Float64.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    xa = _ridge_features(x, mean, std)
    targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
    if xa.shape[0] >= xa.shape[1]:
        eigs, q = np.linalg.eigh(xa.T @ xa)
        lhs, rhs = q, q.T @ (xa.T @ targets)
    else:
        eigs, q = np.linalg.eigh(xa @ xa.T)
        lhs, rhs = xa.T @ q, q.T @ targets
    return {"mean": mean, "std": std, "eigs": eigs, "lhs": lhs, "rhs": rhs}


def _ridge_features(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = (np.asarray(x, np.float64) - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def ridge_weights(cache: dict[str, np.ndarray], l2_regs: Sequence[float]) -> np.ndarray:
    """Ridge weights ``[len(l2_regs), D + 1, C]`` on the whitened, bias-augmented features.

    Row ``D`` of each matrix multiplies the constant ``BIAS_CONSTANT`` feature.
    """
    scaling = 1.0 / (cache["eigs"][None, :] + np.asarray(l2_regs, np.float64)[:, None])
    return np.stack([(cache["lhs"] * s) @ cache["rhs"] for s in scaling])


def ridge_logits(cache: dict[str, np.ndarray], x: np.ndarray,
                 l2_regs: Sequence[float]) -> np.ndarray:
    """Predictions ``[len(l2_regs), N, C]`` of the ridge solutions for ``x`` [N, D].

    ``x`` is whitened with the training statistics in ``cache``.
    """
    proj = _ridge_features(x, cache["mean"], cache["std"]) @ cache["lhs"]  # [N, r]
    scaling = 1.0 / (cache["eigs"][None, :] + np.asarray(l2_regs, np.float64)[:, None])
    return np.stack([(proj * s) @ cache["rhs"] for s in scaling])


def fewshot_ridge(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                  val_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                  num_classes: int, shots: Sequence[int] = SHOTS,
                  l2_regs: Sequence[float] = L2_REGS, seed: int = 0) -> dict[int, dict]:
    """Few-shot ridge probe for each shot count, ``l2`` chosen on validation.

    For each ``k`` in ``shots``: ``k`` examples per class are drawn from the training features
    (:func:`fewshot_indices`, ``seed``), the ridge solutions for every ``l2`` in ``l2_regs`` are
    computed from one eigendecomposition, the ``l2`` with the highest top-1 on ``(val_x,
    val_y)`` is chosen (ties: first in ``l2_regs``), and the test top-1 at that ``l2`` reported.

    Returns:
      ``{k: {"acc1": test top-1, "val_acc1": validation top-1, "l2_reg": chosen l2}}``.

    Raises:
      ValueError: a class has fewer than ``k`` training examples for some ``k`` (the
        evaluation is not silently skipped: a missing metric is easy to overlook), or inputs
        have wrong shapes, labels, or non-finite values.
    """
    train_x, train_y = _check_xy("few-shot train", train_x, train_y, num_classes)
    val_x, val_y = _check_xy("few-shot validation", val_x, val_y, num_classes)
    test_x, test_y = _check_xy("few-shot test", test_x, test_y, num_classes)
    l2_regs = [float(r) for r in l2_regs]
    if not l2_regs or min(l2_regs) <= 0:
        raise ValueError(f"l2_regs={l2_regs}: give a non-empty grid of positive values.")
    results = {}
    for k in shots:
        idx = fewshot_indices(train_y, k, num_classes=num_classes, seed=seed)
        cache = ridge_precompute(train_x[idx], train_y[idx], num_classes=num_classes)
        val_acc = (ridge_logits(cache, val_x, l2_regs).argmax(-1) == val_y[None]).mean(axis=1)
        best = _choose(val_acc)
        test_pred = ridge_logits(cache, test_x, [l2_regs[best]])[0].argmax(-1)
        results[int(k)] = {"acc1": float(np.mean(test_pred == test_y)),
                           "val_acc1": float(val_acc[best]), "l2_reg": l2_regs[best]}
    return results


# -------------------------------------------------------------------------------------------
# Multinomial logistic regression (CLIP's linear probe).
# -------------------------------------------------------------------------------------------


class LogisticFit(NamedTuple):
    """A fitted logistic regression: ``logits = x @ w + b``."""
    w: np.ndarray  # [D, C]
    b: np.ndarray  # [C]
    loss: float  # Regularised objective at (w, b).
    num_iter: int  # L-BFGS iterations run.
    grad_norm: float  # Gradient norm at the end (< tol when converged).


def logistic_objective(params: dict, x: jax.Array, y: jax.Array,
                       weight_decay: jax.Array) -> jax.Array:
    """``mean CE(x @ w + b, y) + weight_decay / 2 * ||w||^2`` (bias not penalised)."""
    logits = jnp.dot(x, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * weight_decay * jnp.sum(jnp.square(params["w"]))


def _cpu_device() -> jax.Device:
    """The host CPU (small problem; keeps it off the accelerator), else the default device."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes cpu: the dots use Precision.HIGHEST anyway.
        return jax.devices()[0]


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit_lbfgs(x, y, weight_decay, tol, *, num_classes: int, max_iter: int):
    """L-BFGS from zeros, as in optax's documented full-batch loop (``lax.while_loop``)."""
    params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    fun = functools.partial(logistic_objective, x=x, y=y, weight_decay=weight_decay)
    opt = optax.lbfgs()
    # Reuses the value and gradient the line search already computed at the new point.
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    params, state = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
    value, grad = value_and_grad(params, state=state)
    return params, value, optax.tree.get(state, "count"), optax.tree.norm(grad)


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, *, num_classes: int,
                            weight_decay: float, max_iter: int = MAX_ITER,
                            tol: float = TOL) -> LogisticFit:
    """Minimises :func:`logistic_objective` with ``optax.lbfgs`` (float32, CPU, jit).

    Starts from zero weights and stops when the gradient's L2 norm is below ``tol`` or after
    ``max_iter`` iterations (small ``weight_decay`` on separable data may need all of them;
    CLIP's protocol caps at 1000 as well). One compilation per (data shape, ``num_classes``,
    ``max_iter``); ``weight_decay`` and ``tol`` are traced, so a grid reuses it.
    """
    x, y = _check_xy("logistic regression train", x, y, num_classes)
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay}: must be >= 0.")
    args = jax.device_put((x.astype(np.float32), y.astype(np.int32), np.float32(weight_decay),
                           np.float32(tol)), _cpu_device())
    params, loss, count, grad_norm = _fit_lbfgs(*args, num_classes=num_classes,
                                                max_iter=int(max_iter))
    loss = float(loss)
    if not np.isfinite(loss):
        raise FloatingPointError(f"logistic regression (weight_decay={weight_decay}) diverged "
                                 f"to a non-finite loss; check the feature scale.")
    return LogisticFit(np.asarray(params["w"]), np.asarray(params["b"]), loss, int(count),
                       float(grad_norm))


def logistic_regression_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                              val_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                              num_classes: int,
                              weight_decays: Sequence[float] = WEIGHT_DECAYS,
                              max_iter: int = MAX_ITER, tol: float = TOL) -> dict[str, float]:
    """CLIP-style linear probe: logistic regression per weight decay, chosen on validation.

    Fits :func:`fit_logistic_regression` on all of ``train_x`` for each value of
    ``weight_decays``, keeps the one with the best validation top-1 (ties: first in grid
    order) and evaluates it on the test features.

    Returns:
      ``acc1``, ``acc5`` (only when ``num_classes >= 5``), ``mean_per_class_recall`` on the test
      split, ``val_acc1`` and the chosen ``weight_decay``.
    """
    train_x, train_y = _check_xy("logistic regression train", train_x, train_y, num_classes)
    val_x, val_y = _check_xy("logistic regression validation", val_x, val_y, num_classes)
    test_x, test_y = _check_xy("logistic regression test", test_x, test_y, num_classes)
    weight_decays = [float(w) for w in weight_decays]
    if not weight_decays:
        raise ValueError("weight_decays is empty: give at least one value.")
    fits, val_accs = [], []
    for wd in weight_decays:
        fit = fit_logistic_regression(train_x, train_y, num_classes=num_classes,
                                      weight_decay=wd, max_iter=max_iter, tol=tol)
        fits.append(fit)
        val_accs.append(float(np.mean((val_x @ fit.w + fit.b).argmax(1) == val_y)))
    best = _choose(val_accs)
    fit = fits[best]
    out = classification_metrics(test_x @ fit.w + fit.b, test_y, num_classes)
    out.update(val_acc1=val_accs[best], weight_decay=weight_decays[best])
    return out


# -------------------------------------------------------------------------------------------
# Evaluator entry point.
# -------------------------------------------------------------------------------------------


def _split(data: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    split = data[key]
    if not isinstance(split, dict) or "image" not in split or "label" not in split:
        raise ValueError(f"data[{key!r}] must be a dict with 'image' [N, H, W, 3] and 'label' "
                         f"[N] arrays.")
    return np.asarray(split["image"]), np.asarray(split["label"])


def evaluate(extractor: FeatureExtractor, tokenizer, data: dict, *,
             shots: Sequence[int] = SHOTS, l2_regs: Sequence[float] = L2_REGS,
             weight_decays: Sequence[float] = WEIGHT_DECAYS, max_iter: int = MAX_ITER,
             tol: float = TOL, val_fraction: float = 0.2, seed: int = 0) -> dict[str, float]:
    """Linear probe (logistic regression) and few-shot ridge probes on frozen image features.

    ``data`` holds the test split as ``image`` [N, H, W, 3], ``label`` [N] and ``class_names``;
    the probe's training images as ``data['probe_train'] = {'image': ..., 'label': ...}`` and
    optionally ``data['probe_val']`` (same layout). Without ``probe_val``, a seeded
    (``seed``), class-stratified ``val_fraction`` of ``probe_train`` is held out for choosing
    the regularisation; both probes train on the rest. Few-shot sets are drawn from that
    training part. ``tokenizer`` is unused (same signature as the other evaluators).

    Returns:
      ``acc1``, ``acc5`` (when there are >= 5 classes), ``mean_per_class_recall`` of the
      logistic probe, and ``fewshot_{k}shot_acc1`` for each ``k`` in ``shots``; all in [0, 1].
      The chosen regularisations are not metrics; :func:`logistic_regression_probe` and
      :func:`fewshot_ridge` return them.

    Raises:
      ValueError: ``probe_train`` is missing, or a class has fewer than ``k`` training examples
        for a requested ``k`` shots (checked before any feature is extracted).
    """
    del tokenizer
    if "probe_train" not in data:
        raise ValueError(
            "linear_probe evaluator: data['probe_train'] is missing. Set it to {'image': "
            "[N, H, W, 3] training images, 'label': [N] class indices} (and optionally "
            "data['probe_val'] in the same layout); the test split stays in data['image'] / "
            "data['label'].")
    num_classes = len(data["class_names"])
    train_img, train_y = _split(data, "probe_train")
    if "probe_val" in data:
        val_img, val_y = _split(data, "probe_val")
    else:
        train_idx, val_idx = stratified_split(train_y, fraction=val_fraction, seed=seed)
        if len(val_idx) == 0:
            raise ValueError(
                f"linear_probe evaluator: holding out val_fraction={val_fraction} of the "
                f"{len(train_y)} probe_train examples leaves no validation example; set "
                f"data['probe_val'] or provide more probe_train images.")
        val_img, val_y = train_img[val_idx], train_y[val_idx]
        train_img, train_y = train_img[train_idx], train_y[train_idx]
    test_y = np.asarray(data["label"])
    # Fail before the (slow) feature extraction: labels in range, enough examples per shot.
    for name, y in (("probe_train", train_y), ("probe_val", val_y), ("test", test_y)):
        _check_xy(name, np.zeros((len(y), 1)), y, num_classes)
    for k in shots:
        fewshot_indices(train_y, k, num_classes=num_classes, seed=seed)

    train_x = extractor.images(train_img)
    val_x = extractor.images(val_img)
    test_x = extractor.images(np.asarray(data["image"]))

    probe = logistic_regression_probe(train_x, train_y, val_x, val_y, test_x, test_y,
                                      num_classes=num_classes, weight_decays=weight_decays,
                                      max_iter=max_iter, tol=tol)
    out = {k: probe[k] for k in ("acc1", "acc5", "mean_per_class_recall") if k in probe}
    few = fewshot_ridge(train_x, train_y, val_x, val_y, test_x, test_y,
                        num_classes=num_classes, shots=shots, l2_regs=l2_regs, seed=seed)
    for k, r in few.items():
        out[f"fewshot_{k}shot_acc1"] = r["acc1"]
    return out
