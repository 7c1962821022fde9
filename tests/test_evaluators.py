"""Zero-shot and retrieval metrics against brute-force numpy references and hand-computed cases;
sharded evaluation against a single device."""
import jax
import numpy as np
import pytest

from vlm_jax import evaluation, parallel, train
from vlm_jax.config import load_config
from vlm_jax.evaluators import retrieval, zeroshot
from vlm_jax.evaluators.common import FeatureExtractor


def _brute_recall(sim, t2i, k):
    n_img, n_txt = sim.shape
    i2t = np.mean([any(t2i[j] == i for j in np.argsort(-sim[i])[:k]) for i in range(n_img)])
    t2i_r = np.mean([t2i[j] in np.argsort(-sim[:, j])[:k] for j in range(n_txt)])
    return i2t, t2i_r


def test_recall_matches_bruteforce_multi_caption():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(30, 8))
    t2i = np.repeat(np.arange(30), 3)  # Three captions per image, as COCO has five.
    txt = img[t2i] + rng.normal(scale=1.5, size=(90, 8))
    out = retrieval.recall_at_k(img, txt, t2i)
    for k in (1, 5, 10):
        i2t, t2i_r = _brute_recall(img @ txt.T, t2i, k)
        assert out[f"text_retrieval_recall@{k}"] == i2t
        assert out[f"image_retrieval_recall@{k}"] == t2i_r
    assert 0 < out["text_retrieval_recall@1"] < 1


def test_topk_and_per_class_recall():
    logits = np.array([[3, 2, 1], [1, 3, 2], [1, 2, 3], [3, 1, 2]], float)
    labels = np.array([0, 2, 2, 1])
    assert zeroshot.topk_accuracy(logits, labels, 1) == 0.5  # rows 0 and 2.
    assert zeroshot.topk_accuracy(logits, labels, 2) == 0.75  # + row 1.
    pred = logits.argmax(1)
    # Class 0: 1/1, class 1: 0/1, class 2: 1/2.
    assert zeroshot.mean_per_class_recall(pred, labels, 3) == np.mean([1.0, 0.0, 0.5])


def test_recall_hand_computed_5x5():
    """5 images x 5 captions (caption j belongs to image j); ranks read off by hand."""
    sim = np.array([[.9, .1, .2, .3, .4],     # image 0: its caption ranked 1st
                    [.8, .7, .15, .2, .3],    # image 1: 2nd
                    [.85, .8, .1, .7, .6],    # image 2: 5th
                    [.1, .2, .3, .4, .5],     # image 3: 2nd
                    [.5, .4, .3, .2, .1]])    # image 4: 5th
    # Text -> image (columns): caption 0 ranks its image 1st, caption 1 2nd (after image 2's
    # .8), caption 2 5th, caption 3 2nd (after image 2's .7), caption 4 5th.
    out = retrieval.recall_at_k(sim, np.eye(5), np.arange(5), ks=(1, 2, 5))
    assert out["text_retrieval_recall@1"] == 1 / 5
    assert out["text_retrieval_recall@2"] == 3 / 5
    assert out["text_retrieval_recall@5"] == 1.0
    assert out["image_retrieval_recall@1"] == 1 / 5
    assert out["image_retrieval_recall@2"] == 3 / 5
    assert out["image_retrieval_recall@5"] == 1.0


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_multi_device_eval_equals_single_device(repo_root, mesh_shape):
    """Features and metrics of a model sharded over 8 devices equal those on one device."""
    config = load_config(str(repo_root / "experiments" / "clip_tiny.py") + ":test")
    rng = np.random.default_rng(0)
    n, size = 50, config.model.image.image_size  # 50: not a multiple of the batch (padding)
    data = {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "text": rng.integers(4, 60, (n, config.model.text.context_length)).astype(np.int32),
            "label": rng.integers(0, 3, n), "class_names": ["a", "b", "c"],
            "templates": ("{}.", "a {}.")}
    data["text"][:, 10] = 3  # eos

    class Tok:
        def encode(self, texts):
            return np.stack([np.r_[np.full(5, 4 + len(t)), 3, np.zeros(
                config.model.text.context_length - 6)] for t in texts]).astype(np.int32)

    results, feats = [], []
    for shape, devices in ((mesh_shape, jax.devices()), (dict(data=1), jax.devices()[:1])):
        s = train.setup(config, mesh=parallel.create_mesh(shape, devices))
        params = s.init_fn()["params"]
        ex = FeatureExtractor(s.graphdef, params, s.param_shardings, s.mesh, s.rules, 16)
        feats.append((ex.images(data["image"]), ex.texts(data["text"])))
        entries = [e for e in evaluation.parse_entries(config)
                   if e.type in ("zeroshot", "retrieval")]
        results.append(evaluation.run_entries(ex, Tok(), entries,
                                              {e.name: data for e in entries}))
    np.testing.assert_allclose(feats[0][0], feats[1][0], atol=1e-5)
    np.testing.assert_allclose(feats[0][1], feats[1][1], atol=1e-5)
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert results[0][k] == pytest.approx(results[1][k], abs=1 / n), k
