"""Train-step throughput on this machine's CPU: images/s and achieved FLOP/s against a measured
matmul peak.

    python benchmarks/train_throughput.py            # tiny config and CLIP ViT-B/32
    python benchmarks/train_throughput.py --models tiny --steps 20

Runs the real train step (``vlm_jax.train.make_train_step``: forward, backward, AdamW update,
donated state) on one CPU device with synthetic batches already in memory, so the figure is the
step alone, not the input pipeline. The peak is the best of several float32 ``N x N`` matmuls of
the same XLA CPU backend; ``MFU`` here is achieved model FLOP/s (3 x forward FLOPs per example,
as in the training logs) over that peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vlm_jax import config as config_lib  # noqa: E402
from vlm_jax import parallel, train  # noqa: E402
from vlm_jax.models.clip import clip_config  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def matmul_seconds(n: int = 2048, repeats: int = 10) -> float:
    """Best time of a float32 ``n x n @ n x n`` matmul on the default device."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best float32 FLOP/s of an ``n x n @ n x n`` matmul on the default device."""
    return 2 * n ** 3 / matmul_seconds(n, repeats)


def _config(name: str, batch: int):
    tiny = config_lib.load_config(os.path.join(REPO, "experiments/clip_tiny.py"))
    # The towers of the quickstart's first recipe (class token, MLPs of 4 x width, 24-token
    # context): the ones benchmarks/vs_open_clip.py builds in open_clip and docs/benchmarks.md's
    # step tables measured. "quickstart" is the quickstart's current towers.
    if name == "quickstart":
        tiny.batch_size = batch
        return tiny
    from experiments import clip_tiny  # pylint: disable=import-outside-toplevel

    clip_tiny.first_recipe(tiny)
    if name == "tiny":
        tiny.batch_size = batch
        return tiny
    # The tiny run's trainer settings around a published model preset.
    model = clip_config(name)
    model["dtype"] = "float32"
    tiny.model = model
    tiny.batch_size = batch
    return tiny


def make_step(name: str, batch: int):
    """``(setup, jitted train step, initial state, synthetic global batch)`` of a model on one
    CPU device (also benchmarks/step_profile.py's)."""
    config = _config(name, batch)
    mesh = parallel.create_mesh({}, devices=jax.devices()[:1])
    s = train.setup(config, mesh)
    size, ctx = config.model.image.image_size, config.model.text.context_length
    rng = np.random.default_rng(0)
    text = rng.integers(4, 200, size=(batch, ctx)).astype(np.int32)
    text[:, -1] = config.model.text.eos_id
    # uint8 pixels, as every pipeline ships them (the model normalises them on the device).
    images = rng.integers(0, 256, size=(batch, size, size, 3)).astype(np.uint8)
    step = train.make_train_step(s)  # The family's batch spec, as `vlm-jax train`.
    return s, step, s.init_fn(), parallel.make_global_batch({"image": images, "text": text},
                                                             mesh)


def compile_step(config, batch: dict[str, np.ndarray]):
    """``(setup, jitted step, state, global batch, compiled FLOPs per step, optimizer-state
    bytes)`` of ``config``'s train step on one CPU device for a synthetic host ``batch``
    (benchmarks/flamingo_frozen.py and lit_step.py)."""
    mesh = parallel.create_mesh({}, devices=jax.devices()[:1])
    s = train.setup(config, mesh)
    step = train.make_train_step(s, {k: v.shape for k, v in batch.items()})
    gbatch = parallel.make_global_batch(batch, mesh)
    state = s.init_fn()
    cost = step.lower(state, gbatch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    opt_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(s.abstract_state["opt_state"]))
    return s, step, state, gbatch, float(cost.get("flops", 0.0)), opt_bytes


def time_steps(step, state, batch, steps: int):
    """``(state, mean seconds per step)`` over ``steps`` steps after one untimed step (the
    state is donated, so the returned one must be used next)."""
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return state, (time.perf_counter() - t) / steps


def bench(name: str, batch: int, steps: int) -> dict:
    s, step, state, b = make_step(name, batch)
    config = s.config
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    flops = 3 * s.family.flops_per_example(config.model) * batch
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return dict(model=name, batch=batch, params_m=n_params / 1e6, step_s=dt, times=times,
                images_per_s=batch / dt, tflops=flops / dt / 1e12, compile_s=compile_s)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "ViT-B/32"])
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch per model (default: tiny 128, others 16)")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    peak = matmul_peak()
    print(f"# {jax.devices()[0].device_kind} x{os.cpu_count()} cores; jax {jax.__version__}; "
          f"measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3)")
    print("| model | params | batch | step (s) | images/s | achieved GFLOP/s | MFU vs matmul peak "
          "| compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    batches = args.batch or [128 if m in ("tiny", "quickstart") else 16 for m in args.models]
    for name, batch in zip(args.models, batches):
        r = bench(name, batch, args.steps)
        print(f"| {r['model']} | {r['params_m']:.1f}M | {r['batch']} | {r['step_s']:.3f} | "
              f"{r['images_per_s']:.1f} | {r['tflops'] * 1e3:.1f} | "
              f"{100 * r['tflops'] * 1e12 / peak:.0f}% | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
