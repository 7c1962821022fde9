"""What freezing the vision encoder and the language model saves in a Flamingo train step:
optimizer-state bytes, compiled FLOPs per step (XLA's cost analysis) and step time on this CPU.

    python benchmarks/flamingo_frozen.py [--steps 10]

Compares ``experiments/flamingo_tiny_shapes.py`` as configured (``optim.trainable``: resampler,
cross-attention blocks and new token embeddings; frozen parameters have ``optax.set_to_zero``
and ``stop_gradient``) with the same model training every parameter (``optim.trainable=''``).
Synthetic batches, one CPU device; the step is the real ``vlm_jax.train.make_train_step``.
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


def _batch(config) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vocab = config.model.lm.vocab_size
    out = {}
    for key, spec in get_family(config).batch_spec(config).items():
        shape, dtype = spec.shape, spec.dtype
        if key == "tokens":
            x = rng.integers(4, vocab, size=shape)
            x[:, [1, 20, 40, 60, 80]] = vocab  # five <image> tokens
        elif key == "weights":
            x = np.ones(shape)
        else:  # uint8 images
            x = rng.integers(0, 256, size=shape)
        out[key] = x.astype(dtype)
    return out


def measure(trainable: str, steps: int) -> dict[str, float]:
    config = config_lib.load_config(os.path.join(REPO, "experiments/flamingo_tiny_shapes.py"),
                                    [f"optim.trainable={trainable}"])
    _, step, state, gbatch, flops, opt_bytes = train_throughput.compile_step(config,
                                                                             _batch(config))
    _, seconds = train_throughput.time_steps(step, state, gbatch, steps)
    return {"opt_state_mib": opt_bytes / 2**20, "gflops_per_step": flops / 1e9,
            "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print("| trained parameters | optimizer state | compiled GFLOP per step | step time (CPU) |")
    print("|---|---|---|---|")
    rows = {}
    for name, pattern in (("bridge only (the config)",
                           r"^(resampler|xattn|extra_embed|extra_head)(\.|$)"), ("all", "")):
        rows[name] = r = measure(pattern, args.steps)
        print(f"| {name} | {r['opt_state_mib']:.2f} MiB | {r['gflops_per_step']:.1f} | "
              f"{r['step_s'] * 1e3:.0f} ms |", flush=True)
    a, b = rows["bridge only (the config)"], rows["all"]
    print(f"\nfrozen / all: optimizer state {a['opt_state_mib'] / b['opt_state_mib']:.2f}x, "
          f"FLOPs {a['gflops_per_step'] / b['gflops_per_step']:.2f}x, "
          f"step time {a['step_s'] / b['step_s']:.2f}x")


if __name__ == "__main__":
    main()
