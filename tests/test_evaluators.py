"""Zero-shot and retrieval metrics against brute-force numpy references."""
import numpy as np

from vlm_jax.evaluators import retrieval, zeroshot


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
