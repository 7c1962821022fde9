"""What locking the image tower (LiT) and caching its embeddings save in a train step:
optimizer-state bytes, compiled FLOPs per step (XLA's cost analysis) and step time on this CPU.

    python benchmarks/lit_step.py [--steps 20] [--rounds 3]

Compares, at ``experiments/lit_tiny_shapes.py``'s sizes and batch (128): the quickstart's CLIP
step (both towers train), the LiT step with the live locked tower (``model.locked='image'``:
its forward pass, no backward, no optimizer state) and the LiT step on cached embeddings
(``data.name='image_embeddings'``: the text tower only). Synthetic batches, one CPU device; the
step is the real ``vlm_jax.train.make_train_step``. The three are timed in turns, ``--rounds``
times, and the best round is kept, so that other jobs on the machine weigh on all three alike.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vlm_jax import config as config_lib  # noqa: E402
import train_throughput  # noqa: E402  (benchmarks/)
from vlm_jax.families import get_family  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# (config, overrides): random towers (init_from={}) time the same as loaded ones.
CASES = {
    "CLIP (both towers train)": ("clip_tiny.py", []),
    "LiT, live locked tower": ("lit_tiny_shapes.py", ["init_from={}"]),
    "LiT, cached embeddings": ("lit_tiny_shapes.py",
                               ["init_from={}", "data.name=image_embeddings"]),
}


def _batch(config) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for key, spec in get_family(config).batch_spec(config).items():
        if key == "text":
            x = rng.integers(4, 200, size=spec.shape)
        elif key == "image_emb":
            x = rng.normal(size=spec.shape)
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
        else:  # uint8 images
            x = rng.integers(0, 256, size=spec.shape)
        out[key] = x.astype(spec.dtype)
    return out


def build(experiment: str, overrides: list[str]):
    """``(run(steps) -> seconds, optimizer-state MiB, compiled GFLOP per step)`` of one case."""
    config = config_lib.load_config(os.path.join(REPO, "experiments", experiment), overrides)
    _, step, state, gbatch, flops, opt = train_throughput.compile_step(config, _batch(config))
    holder = {"state": state}

    def run(steps: int) -> float:
        holder["state"], seconds = train_throughput.time_steps(step, holder["state"], gbatch,
                                                               steps)
        return seconds

    return run, opt / 2**20, flops / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    built = {name: build(*case) for name, case in CASES.items()}
    best = {name: float("inf") for name in CASES}
    for _ in range(args.rounds):
        for name, (run, _, _) in built.items():
            best[name] = min(best[name], run(args.steps))
    print("| step (batch 128, lit_tiny_shapes sizes) | optimizer state | compiled GFLOP per step "
          "| step time (CPU) |")
    print("|---|---|---|---|")
    for name, (_, opt, gflop) in built.items():
        print(f"| {name} | {opt:.2f} MiB | {gflop:.2f} | {best[name] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
