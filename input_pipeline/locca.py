"""LocCa's decoder targets from the shapes records (Cap, ARef, GCap; :mod:`vlm_jax.models.locca`).

:class:`LoccaTargets` draws, per example, one task and (for ARef / GCap) one object of the
scene, and writes the decoder's label sequence with its scored positions and whether the
example is predicted in parallel (CapPa) or autoregressively. It is a grain ``RandomMap``
applied to the global stream before it is split by process, so the draws depend on
``(seed, position)`` only: the same on any number of processes, and restored with the
iterator's position on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from input_pipeline.transforms import to_str
from vlm_jax.models.locca import text_pieces

# The raw features the targets read (shapes 1.2.0, docs/data.md section 9), and what they write.
FEATURES = ("caption", "objects")
OUTPUTS = {"locca_labels": np.int32, "locca_target": np.bool_, "locca_parallel": np.bool_}
TASKS = ("cap", "aref", "gcap")


class LoccaTargets(grain.transforms.RandomMap):
    """Adds ``locca_labels`` int32 [L], ``locca_target`` bool [L] and ``locca_parallel`` bool
    to a raw shapes record.

    Args:
        tokenizer: the caption tokenizer (its pieces are the decoder's text ids).
        layout: the decoder's token layout (:class:`vlm_jax.models.locca.TokenLayout`:
            ``sequence(task, pieces, box)``).
        task_weights: relative frequencies of Cap, ARef, GCap.
        parallel_fraction: the fraction of examples predicted in parallel.

    Cap reads the record's caption; ARef an object's referring expression and its box
    (``objects/refexp``, ``objects/bbox``); GCap an object's box and grounded caption
    (``objects/caption``), the object drawn uniformly among the scene's.
    """

    FEATURES = FEATURES
    OUTPUTS = OUTPUTS

    def __init__(self, tokenizer: Any, layout: Any, task_weights: Sequence[float] = (1, 1, 1),
                 parallel_fraction: float = 0.5):
        w = np.asarray(task_weights, np.float64)
        if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"task_weights={list(task_weights)}: three non-negative weights "
                             "(Cap, ARef, GCap), not all 0.")
        if not 0.0 <= parallel_fraction <= 1.0:
            raise ValueError(f"parallel_fraction={parallel_fraction}: a fraction in [0, 1].")
        self.tokenizer, self.layout = tokenizer, layout
        self.probs = w / w.sum()
        self.parallel_fraction = float(parallel_fraction)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        task = TASKS[int(rng.choice(3, p=self.probs))]
        box = None
        if task == "cap":
            text = to_str(element["caption"])
        else:
            objects = element["objects"]
            k = int(rng.integers(len(objects["bbox"])))
            box = np.asarray(objects["bbox"][k], np.float32)
            text = to_str(objects["refexp" if task == "aref" else "caption"][k])
        labels, target = self.layout.sequence(task, text_pieces(self.tokenizer, [text])[0], box)
        parallel = bool(rng.random() < self.parallel_fraction)
        return {**element, "locca_labels": labels, "locca_target": target,
                "locca_parallel": np.bool_(parallel)}
