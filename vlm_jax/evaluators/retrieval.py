"""Image-text retrieval recall@k, with one or several captions per image (COCO layout)."""

from __future__ import annotations

import numpy as np

from vlm_jax.evaluators.common import FeatureExtractor

KS = (1, 5, 10)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                ks=KS) -> dict[str, float]:
    """Retrieval recall@k.

    ``text_retrieval_recall@k``: for each image, is any of its captions among the ``k`` texts
    most similar to it. ``image_retrieval_recall@k``: for each caption, is its image among the
    ``k`` most similar images. Names follow CLIP_benchmark.
    """
    sim = image_emb @ text_emb.T  # [N_img, N_txt]
    text_to_image = np.asarray(text_to_image)
    out = {}
    # Image -> text: rank of the best-ranked correct caption.
    order = np.argsort(-sim, axis=1)
    correct = text_to_image[order] == np.arange(len(image_emb))[:, None]
    first_hit = correct.argmax(axis=1)
    # Text -> image: rank of the caption's image.
    order_t = np.argsort(-sim.T, axis=1)
    rank_t = (order_t == text_to_image[:, None]).argmax(axis=1)
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = float(np.mean(first_hit < k))
        out[f"image_retrieval_recall@{k}"] = float(np.mean(rank_t < k))
    return out


def evaluate(extractor: FeatureExtractor, tokenizer, data: dict) -> dict[str, float]:
    """Recall@1/5/10 both ways. ``data``: ``image``, ``text`` tokens and optional
    ``text_to_image`` (defaults to one caption per image, in order)."""
    del tokenizer
    img = extractor.images(data["image"])
    txt = extractor.texts(data["text"])
    t2i = data.get("text_to_image")
    if t2i is None:
        t2i = np.arange(len(txt))
    return recall_at_k(img, txt, t2i)
