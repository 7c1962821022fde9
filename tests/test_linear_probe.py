"""Linear-probe evaluators against independent numpy / scipy references.

The references here are written from the protocols' definitions (big_vision's few-shot ridge
regression, CLIP's L2-regularised multinomial logistic regression), not from the code's outputs.
"""
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from vlm_jax.evaluators import linear_probe as lp

# -------------------------------------------------------------------------------------------
# Independent references.
# -------------------------------------------------------------------------------------------


def _ridge_design(x_train, x):
    """big_vision's preprocessing: whiten with the training mean / std + 1e-5, bias column 100."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-5
    return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])


def _ridge_reference(x, y, num_classes, l2):
    """Normal equations (X^T X + l2 I) W = X^T Y with {-1, +1} one-hot targets."""
    design = _ridge_design(x, x)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    a = design.T @ design + l2 * np.eye(design.shape[1])
    return np.linalg.solve(a, design.T @ targets)


def _logreg_objective(theta, x, y, num_classes, wd):
    """mean cross-entropy + wd / 2 ||W||^2 and its gradient; theta = [W.ravel(), b]."""
    n, d = x.shape
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    z = x @ w + b
    logp = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    onehot = np.eye(num_classes)[y]
    f = -np.mean(np.sum(onehot * logp, axis=1)) + 0.5 * wd * np.sum(w ** 2)
    dz = (np.exp(logp) - onehot) / n
    return f, np.concatenate([(x.T @ dz + wd * w).ravel(), dz.sum(axis=0)])


def _logreg_reference(x, y, num_classes, wd):
    d = x.shape[1]
    res = scipy.optimize.minimize(
        _logreg_objective, np.zeros(d * num_classes + num_classes),
        args=(x.astype(np.float64), y, num_classes, wd), jac=True, method="L-BFGS-B",
        options={"maxiter": 10_000, "gtol": 1e-12, "ftol": 1e-15})
    return res.x[:d * num_classes].reshape(d, num_classes), res.x[d * num_classes:], res.fun


def _noisy_problem(n, seed, *, d=5, num_classes=3, sep=1.0):
    """Overlapping Gaussian classes (fixed centers, ``seed`` draws the samples): accuracy
    depends on the regularisation."""
    centers = np.random.default_rng(1234).normal(size=(num_classes, d)) * sep
    y = np.arange(n) % num_classes
    x = centers[y] + np.random.default_rng(seed).normal(size=(n, d))
    return x.astype(np.float32), y


# -------------------------------------------------------------------------------------------
# Metrics and splits.
# -------------------------------------------------------------------------------------------


def test_classification_metrics_hand_computed():
    logits = np.array([[6, 5, 4, 3, 2, 1],   # label 0: top-1 hit.
                       [6, 5, 4, 3, 2, 1],   # label 5: ranked 6th, not in the top 5.
                       [1, 6, 2, 3, 4, 5],   # label 1: top-1 hit.
                       [1, 2, 3, 4, 5, 6]],  # label 1: ranked 5th, top-5 hit only.
                      float)
    labels = np.array([0, 5, 1, 1])
    m = lp.classification_metrics(logits, labels, num_classes=6)
    assert m["acc1"] == 0.5
    assert m["acc5"] == 0.75
    # Predictions [0, 0, 1, 5]. Recall: class 0 1/1, class 1 1/2, class 5 0/1 (absent classes
    # 2, 3, 4 do not count).
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert "acc5" not in lp.classification_metrics(logits[:, :4], np.array([0, 3, 1, 1]), 4)


def test_stratified_split():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 7)
    train, val = lp.stratified_split(labels, fraction=0.2, seed=3)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    # round(0.2 * n) per class; the single example of class 2 stays in training.
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 1, 0, 1]
    again = lp.stratified_split(labels, fraction=0.2, seed=3)
    assert np.array_equal(again[1], val)
    assert any(not np.array_equal(lp.stratified_split(labels, fraction=0.2, seed=s)[1], val)
               for s in range(4, 8))


# -------------------------------------------------------------------------------------------
# Few-shot ridge regression.
# -------------------------------------------------------------------------------------------


def test_fewshot_indices_exact_deterministic_nested():
    labels = np.random.default_rng(0).integers(0, 4, size=200)
    idx = lp.fewshot_indices(labels, 5, num_classes=4, seed=0)
    assert len(np.unique(idx)) == 20
    assert np.bincount(labels[idx], minlength=4).tolist() == [5, 5, 5, 5]
    assert np.array_equal(idx, lp.fewshot_indices(labels, 5, num_classes=4, seed=0))
    assert not np.array_equal(idx, lp.fewshot_indices(labels, 5, num_classes=4, seed=1))
    one = lp.fewshot_indices(labels, 1, num_classes=4, seed=0)
    assert set(one) <= set(idx)  # big_vision's draw: the 1-shot set is inside the 5-shot set.


def test_fewshot_indices_too_few_examples_names_class_and_count():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 6)
    with pytest.raises(ValueError, match=r"class 1 has only 2 training example"):
        lp.fewshot_indices(labels, 5, num_classes=3)
    with pytest.raises(ValueError, match=r"class 3 has only 0"):
        lp.fewshot_indices(labels, 1, num_classes=4)


@pytest.mark.parametrize("n,d", [(40, 6), (9, 25)])  # N > D (eigh of X^T X), N < D (X X^T).
def test_ridge_matches_normal_equations(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d) + rng.normal(size=d)
    y = np.arange(n) % 3
    x_new = rng.normal(size=(7, d))
    l2_regs = [2.0 ** -6, 1.0, 2.0 ** 6, 2.0 ** 14]
    cache = lp.ridge_precompute(x, y, num_classes=3)
    weights = lp.ridge_weights(cache, l2_regs)
    logits = lp.ridge_logits(cache, x_new, l2_regs)
    for i, l2 in enumerate(l2_regs):
        ref = _ridge_reference(x, y, 3, l2)
        np.testing.assert_allclose(weights[i], ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
        ref_logits = _ridge_design(x, x_new) @ ref
        np.testing.assert_allclose(logits[i], ref_logits, rtol=1e-6,
                                   atol=1e-8 * np.abs(ref_logits).max())
    assert not np.allclose(weights[0], weights[-1])  # The regs actually change the solution.


def test_fewshot_ridge_separable_toy_is_perfect():
    # Three classes on the coordinate axes, small jitter: any sensible probe is exact.
    rng = np.random.default_rng(0)

    def split(n):
        y = np.arange(n) % 3
        return np.eye(3)[y] * 3.0 + rng.normal(scale=0.05, size=(n, 3)), y

    out = lp.fewshot_ridge(*split(30), *split(12), *split(60), num_classes=3, shots=(1, 3, 5))
    assert sorted(out) == [1, 3, 5]
    for k in (1, 3, 5):
        assert out[k]["acc1"] == 1.0
        assert out[k]["val_acc1"] == 1.0


def test_fewshot_ridge_chooses_best_validation_reg():
    x_tr, y_tr = _noisy_problem(300, 1, d=8, num_classes=4, sep=0.8)
    x_va, y_va = _noisy_problem(200, 2, d=8, num_classes=4, sep=0.8)
    x_te, y_te = _noisy_problem(200, 3, d=8, num_classes=4, sep=0.8)
    l2_regs = [2.0 ** k for k in range(-4, 20, 3)]
    shots = (2, 10)
    out = lp.fewshot_ridge(x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes=4, shots=shots,
                           l2_regs=l2_regs, seed=5)
    for k in shots:
        # Brute force: the k-shot draw, then one normal-equation solve per regularisation.
        idx = lp.fewshot_indices(y_tr, k, num_classes=4, seed=5)
        xs, ys = x_tr[idx], y_tr[idx]
        val_accs, test_accs = [], []
        for l2 in l2_regs:
            w = _ridge_reference(xs, ys, 4, l2)
            val_accs.append(np.mean((_ridge_design(xs, x_va) @ w).argmax(1) == y_va))
            test_accs.append(np.mean((_ridge_design(xs, x_te) @ w).argmax(1) == y_te))
        best = int(np.argmax(val_accs))
        assert len(set(val_accs)) > 1, "the regularisation grid should matter on this data"
        assert out[k]["l2_reg"] == l2_regs[best]
        assert out[k]["val_acc1"] == pytest.approx(val_accs[best])
        assert out[k]["acc1"] == pytest.approx(test_accs[best])


# -------------------------------------------------------------------------------------------
# Logistic regression. All fits use [60, 5] features and 3 classes: one compilation.
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wd", [1e-2, 1e-3])
def test_logistic_regression_matches_scipy_lbfgsb(wd):
    x, y = _noisy_problem(60, 0)
    fit = lp.fit_logistic_regression(x, y, num_classes=3, weight_decay=wd)
    w_ref, b_ref, f_ref = _logreg_reference(x, y, 3, wd)
    assert fit.num_iter < lp.MAX_ITER and fit.grad_norm < lp.TOL
    assert fit.loss == pytest.approx(f_ref, rel=1e-5)
    np.testing.assert_allclose(fit.w, w_ref, atol=2e-3 * np.abs(w_ref).max())
    # Softmax is invariant to a shift of all biases; the penalty does not fix it. Compare the
    # gauge-free differences (both optimisers start at 0, so their mean stays 0 anyway).
    np.testing.assert_allclose(fit.b - fit.b.mean(), b_ref - b_ref.mean(), atol=2e-3)
    # Independent evaluation of our optimum under the reference objective.
    theta = np.concatenate([fit.w.ravel(), fit.b]).astype(np.float64)
    assert _logreg_objective(theta, x.astype(np.float64), y, 3, wd)[0] == pytest.approx(
        f_ref, rel=1e-5)


def test_logistic_regression_separable_blobs_perfect():
    rng = np.random.default_rng(0)
    centers = np.array([[8, 0, 0, 0, 0], [0, 8, 0, 0, 0], [0, 0, 8, 0, 0]], float)

    def split():
        y = np.arange(60) % 3
        return (centers[y] + rng.normal(size=(60, 5))).astype(np.float32), y

    out = lp.logistic_regression_probe(*split(), *split(), *split(), num_classes=3)
    assert out["acc1"] == 1.0
    assert out["mean_per_class_recall"] == 1.0
    assert "acc5" not in out  # Only 3 classes.
    assert out["weight_decay"] in lp.WEIGHT_DECAYS


def test_logistic_regression_chooses_best_validation_weight_decay():
    x_tr, y_tr = _noisy_problem(60, 0)
    x_va, y_va = _noisy_problem(300, 1)
    x_te, y_te = _noisy_problem(300, 2)
    wds = (1e-4, 1e-2, 1e-1, 1.0, 10.0)
    out = lp.logistic_regression_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes=3,
                                       weight_decays=wds)
    val_accs, test_accs = [], []
    for wd in wds:
        w, b, _ = _logreg_reference(x_tr, y_tr, 3, wd)
        val_accs.append(np.mean((x_va @ w + b).argmax(1) == y_va))
        test_accs.append(np.mean((x_te @ w + b).argmax(1) == y_te))
    best = int(np.argmax(val_accs))
    assert len(set(val_accs)) > 1, "the weight-decay grid should matter on this data"
    assert out["weight_decay"] == wds[best]
    assert out["val_acc1"] == pytest.approx(val_accs[best])
    assert out["acc1"] == pytest.approx(test_accs[best])


# -------------------------------------------------------------------------------------------
# evaluate().
# -------------------------------------------------------------------------------------------


class _FakeExtractor:
    """``images(x)``: a fixed random projection of the flattened images, L2-normalised."""

    def __init__(self, in_dim, out_dim=16):
        self.proj = np.random.default_rng(0).normal(size=(in_dim, out_dim))
        self.calls = 0

    def images(self, images):
        self.calls += 1
        z = np.asarray(images, np.float32).reshape(len(images), -1) @ self.proj
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


NUM_CLASSES = 6


def _toy_images(n, seed, *, signal=200, noise=40):
    """4x4x3 uint8 images: one brighter pixel position per class, plus uniform noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    images = rng.integers(0, noise, size=(n, 4, 4, 3))
    images[np.arange(n), labels // 4, labels % 4, :] += signal
    return images.astype(np.uint8), labels


def _toy_data(n_train=240, n_test=120):
    img, lab = _toy_images(n_test, 1)
    tr_img, tr_lab = _toy_images(n_train, 2)
    return {"image": img, "label": lab, "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
            "probe_train": {"image": tr_img, "label": tr_lab}}


EXPECTED_KEYS = {"acc1", "acc5", "mean_per_class_recall", "fewshot_1shot_acc1",
                 "fewshot_5shot_acc1", "fewshot_10shot_acc1", "fewshot_25shot_acc1"}


def test_evaluate_keys_and_ranges():
    data = _toy_data()  # 40 per class; 32 stay for training after the 20 % hold-out.
    ext = _FakeExtractor(4 * 4 * 3)
    out = lp.evaluate(ext, None, data)
    assert set(out) == EXPECTED_KEYS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    # The classes are separable in pixel space: wiring errors (e.g. misaligned labels) fail here.
    assert out["acc1"] > 0.95 and out["fewshot_25shot_acc1"] > 0.95

    # With an explicit probe_val of the same sizes (192 train / 48 val): no hold-out.
    tr_img, tr_lab = _toy_images(192, 2)
    va_img, va_lab = _toy_images(48, 3)
    data2 = dict(data, probe_train={"image": tr_img, "label": tr_lab},
                 probe_val={"image": va_img, "label": va_lab})
    out2 = lp.evaluate(ext, None, data2, shots=(1, 5))
    assert set(out2) == {"acc1", "acc5", "mean_per_class_recall", "fewshot_1shot_acc1",
                         "fewshot_5shot_acc1"}
    assert all(0.0 <= v <= 1.0 for v in out2.values())


def test_evaluate_missing_probe_train_says_what_to_set():
    data = _toy_data()
    del data["probe_train"]
    with pytest.raises(ValueError, match=r"data\['probe_train'\] is missing.*'image'.*'label'"):
        lp.evaluate(_FakeExtractor(48), None, data)


def test_evaluate_too_few_shots_fails_before_extracting():
    data = _toy_data(n_train=60)  # 10 per class, 8 after the hold-out: 10 shots impossible.
    ext = _FakeExtractor(48)
    with pytest.raises(ValueError, match=r"10-shot probe: class 0 has only 8"):
        lp.evaluate(ext, None, data, shots=(1, 10))
    assert ext.calls == 0


def _reference_metrics(logits, labels):
    """top-1, top-5 and mean per-class recall, spelled out."""
    order = np.argsort(-logits, axis=1)
    pred = order[:, 0]
    recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return {"acc1": np.mean(pred == labels),
            "acc5": np.mean([labels[i] in order[i, :5] for i in range(len(labels))]),
            "mean_per_class_recall": np.mean(recalls)}


def test_evaluate_matches_independent_references():
    # Noisy images: accuracies well below 1, so the chosen regularisations matter.
    img, lab = _toy_images(300, 11, signal=60, noise=200)
    tr_img, tr_lab = _toy_images(192, 12, signal=60, noise=200)
    va_img, va_lab = _toy_images(48, 13, signal=60, noise=200)
    data = {"image": img, "label": lab, "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
            "probe_train": {"image": tr_img, "label": tr_lab},
            "probe_val": {"image": va_img, "label": va_lab}}
    ext = _FakeExtractor(4 * 4 * 3)
    wds, shots = (1e-3, 1e-2, 1e-1, 1.0), (1, 5, 10)
    out = lp.evaluate(ext, None, data, shots=shots, weight_decays=wds, seed=4)
    f_tr, f_va, f_te = ext.images(tr_img), ext.images(va_img), ext.images(img)

    # Logistic probe: scipy fit per weight decay, best on validation (first on ties).
    fits = [_logreg_reference(f_tr, tr_lab, NUM_CLASSES, wd)[:2] for wd in wds]
    val_accs = [np.mean((f_va @ w + b).argmax(1) == va_lab) for w, b in fits]
    assert len(set(val_accs)) > 1
    w, b = fits[int(np.argmax(val_accs))]
    ref = _reference_metrics(f_te @ w + b, lab)
    assert 0.2 < ref["acc1"] < 0.95
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key

    # Few-shot: normal equations per l2 on the seeded draw, best on validation.
    for k in shots:
        idx = lp.fewshot_indices(tr_lab, k, num_classes=NUM_CLASSES, seed=4)
        ws = [_ridge_reference(f_tr[idx], tr_lab[idx], NUM_CLASSES, l2) for l2 in lp.L2_REGS]
        val_accs = [np.mean((_ridge_design(f_tr[idx], f_va) @ w).argmax(1) == va_lab) for w in ws]
        w = ws[int(np.argmax(val_accs))]
        expected = np.mean((_ridge_design(f_tr[idx], f_te) @ w).argmax(1) == lab)
        assert out[f"fewshot_{k}shot_acc1"] == pytest.approx(expected, abs=1e-12), k

    # Without probe_val: the same as passing the seeded stratified 20 % hold-out explicitly.
    # 240 images split 192 / 48: the shapes above, so no new compilation.
    all_img, all_lab = _toy_images(240, 14, signal=60, noise=200)
    tr_idx, va_idx = lp.stratified_split(all_lab, fraction=0.2, seed=4)
    assert (len(tr_idx), len(va_idx)) == (192, 48)
    held = dict(data, probe_train={"image": all_img, "label": all_lab})
    del held["probe_val"]
    explicit = dict(data, probe_train={"image": all_img[tr_idx], "label": all_lab[tr_idx]},
                    probe_val={"image": all_img[va_idx], "label": all_lab[va_idx]})
    kw = {"shots": shots, "weight_decays": wds, "seed": 4}
    held_out = lp.evaluate(ext, None, held, **kw)
    assert held_out == lp.evaluate(ext, None, explicit, **kw)
