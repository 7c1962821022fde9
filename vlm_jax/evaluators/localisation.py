"""Referring-expression localisation: box accuracy at an IoU threshold (RefCOCO's protocol, as
LocCa reports it).

For every image and its referring expression ("the square in the top left") the model predicts
one box; a prediction is correct when its intersection over union with the true box is at least
``iou_threshold`` (0.5). Boxes are ``(ymin, xmin, ymax, xmax)`` in fractions of the image side,
the TFDS ``BBoxFeature`` convention the shapes records use (``refexp``, ``refexp_bbox``).

The model side is a small protocol, :class:`BoxPredictor`: anything with
``locate(images, expressions) -> boxes``. The evaluation's extractor provides it for a model
family with the ``locate`` capability.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class BoxPredictor(Protocol):
    """Predicts the box an expression refers to, one per image."""

    def locate(self, images: np.ndarray, expressions: Sequence[str]) -> np.ndarray:
        """``images`` uint8 [N, H, W, 3], ``expressions`` N strings -> boxes [N, 4]
        ``(ymin, xmin, ymax, xmax)`` in fractions of the image side."""


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise intersection over union of boxes ``a`` and ``b`` [N, 4] (ymin, xmin, ymax,
    xmax); 0 where the union is empty. Boxes with ymax < ymin (or xmax < xmin) have no area."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    extent_a = np.clip(a[:, 2:] - a[:, :2], 0, None)
    extent_b = np.clip(b[:, 2:] - b[:, :2], 0, None)
    overlap = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
    inter = overlap.prod(axis=1)
    union = extent_a.prod(axis=1) + extent_b.prod(axis=1) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def evaluate(extractor, tokenizer, data: dict, iou_threshold: float = 0.5) -> dict[str, float]:
    """Referring-expression box accuracy.

    Args:
        extractor: a :class:`BoxPredictor` (the run's extractor for a ``locate`` model).
        tokenizer: unused (the predictor tokenises the expressions its own way).
        data: ``image`` [N, H, W, 3], ``refexp`` (N strings) and ``refexp_bbox`` [N, 4].
        iou_threshold: IoU from which a predicted box counts as correct.

    Returns:
        ``{'acc@<iou_threshold>': fraction of correct boxes, 'mean_iou': mean IoU}``.

    Raises:
        ValueError: the extractor cannot predict boxes, or predicts other than [N, 4].
    """
    del tokenizer
    if not isinstance(extractor, BoxPredictor):
        raise ValueError("refexp needs a model that predicts boxes (the 'locate' capability: "
                         "locate(images, expressions) -> [N, 4] boxes); this one cannot.")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold}: choose a value in (0, 1].")
    truth = np.asarray(data["refexp_bbox"], np.float64)
    expressions = list(data["refexp"])
    predicted = np.asarray(extractor.locate(data["image"], expressions), np.float64)
    if predicted.shape != truth.shape:
        raise ValueError(f"locate() returned boxes of shape {predicted.shape}; expected "
                         f"[N, 4] = {truth.shape} (ymin, xmin, ymax, xmax per expression).")
    iou = box_iou(predicted, truth)
    return {f"acc@{iou_threshold:g}": float(np.mean(iou >= iou_threshold)),
            "mean_iou": float(np.mean(iou))}
