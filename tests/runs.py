"""Helpers of the end-to-end tests that read what a `vlm-jax train` run wrote."""
from __future__ import annotations

from vlm_jax import metrics as metrics_lib


def train_losses(workdir) -> dict[int, float]:
    """Step -> ``train/loss`` of a run's metrics.jsonl (local or gs://); where a resumed run
    logged a step again, its last record (the one logged after the resume)."""
    return {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(workdir)
            if "train/loss" in r}


def train_losses_per_run(workdir) -> dict[int, list[float]]:
    """Step -> every ``train/loss`` logged for it, in order: one per run that computed the step
    (the first run's, then each resumed run's)."""
    out: dict[int, list[float]] = {}
    for r in metrics_lib.read_metrics(workdir):
        if "train/loss" in r:
            out.setdefault(r["step"], []).append(r["train/loss"])
    return out
