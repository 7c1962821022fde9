"""Zero-shot classification as in CLIP: class embeddings from prompt templates.

For each class, every template ("a photo of a {}.") is filled with the class name, encoded and
L2-normalised; the class embedding is the normalised mean over templates. An image is assigned
to the class with the highest cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax.evaluators.common import FeatureExtractor, normalize


def class_embeddings(extractor: FeatureExtractor, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """[C, D] normalised mean over templates of the normalised text embeddings."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = extractor.texts(tokenizer.encode(prompts))
    emb = normalize(emb).reshape(len(class_names), len(templates), -1).mean(axis=1)
    return normalize(emb)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def mean_per_class_recall(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of the per-class recall."""
    recalls = [np.mean(pred[labels == c] == c) for c in range(num_classes) if np.any(labels == c)]
    return float(np.mean(recalls))


def evaluate(extractor: FeatureExtractor, tokenizer, data: dict) -> dict[str, float]:
    """Zero-shot top-1 / top-5 accuracy and mean per-class recall.

    ``data`` holds ``image`` [N, H, W, 3], ``label`` [N], ``class_names`` and ``templates``.
    """
    classifier = class_embeddings(extractor, tokenizer, data["class_names"], data["templates"])
    img = extractor.images(data["image"])
    logits = img @ classifier.T
    labels = np.asarray(data["label"])
    return {
        "acc1": topk_accuracy(logits, labels, 1),
        "acc5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(1), labels,
                                                        len(data["class_names"])),
    }
