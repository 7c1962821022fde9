"""Compiled matrix-product FLOPs of a CLIP train step against the analytic forward count, with and
without rematerialisation: where ``vlm-jax compile``'s "compiled / model FLOPs" comes from.

    python benchmarks/remat_flops.py [--config experiments/clip_tiny.py] [--batch 16]

Compiles (on this machine's CPU, one device) the forward pass and the gradient of a CLIP model
for ``remat`` none / full, layers unrolled and scanned, and counts the ``dot`` / ``convolution``
FLOPs of each compiled module (:func:`vlm_jax.aot.hlo_matmul_flops`, loops weighted by their
trip counts). Prints them over ``forward`` and over ``3 x forward``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vlm_jax import aot  # noqa: E402
from vlm_jax import config as config_lib  # noqa: E402
from vlm_jax.families import get_family  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="experiments/clip_tiny.py")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    print("| remat | layers | compiled forward / analytic | compiled gradient / (3 x analytic) |")
    print("|---|---|---|---|")
    for remat, scan in (("none", False), ("full", False), ("full", True)):
        cfg = config_lib.load_config(args.config, [f"model.remat={remat}",
                                                   f"model.scan_layers={scan}"])
        family = get_family(cfg)
        graphdef, params = nnx.split(family.build_model(cfg.model, nnx.Rngs(0)))
        side = cfg.model.image.image_size
        images = jnp.zeros((args.batch, side, side, 3), jnp.uint8)
        texts = jnp.ones((args.batch, cfg.model.text.context_length), jnp.int32)

        def forward(p_):
            out = nnx.merge(graphdef, p_)(images, texts)
            return jnp.sum(out["image_emb"] @ out["text_emb"].T)

        analytic = family.flops_per_example(cfg.model, batch_size=args.batch) * args.batch
        fwd = aot.hlo_matmul_flops(jax.jit(forward).lower(params).compile().as_text())[0]
        grad = aot.hlo_matmul_flops(
            jax.jit(jax.grad(forward)).lower(params).compile().as_text())[0]
        print(f"| {remat} | {'scanned' if scan else 'unrolled'} | {fwd / analytic:.3f} | "
              f"{grad / (3 * analytic):.3f} |")


if __name__ == "__main__":
    main()
