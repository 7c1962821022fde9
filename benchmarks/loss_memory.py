"""Per-device memory of each contrastive-loss variant at global batch 32k to 1M, by ahead-of-time
compilation of loss + gradients for TPU slices (libtpu; no TPU needed).

    python benchmarks/loss_memory.py
    python benchmarks/loss_memory.py --topologies v5e:8x8 --batches 32768 1048576 --chunk-size 8192

For every variant, the value and gradients (w.r.t. image and text features and the scale(s)) of
the sharded loss are lowered for bfloat16 ``[B, 512]`` features (ViT-B's embedding width)
sharded over all devices of the slice, and compiled by the TPU compiler. The table gives the
compiler's temporaries per device; when they exceed HBM the compiler's own requirement is
printed instead (from its out-of-memory message). ``b x B`` is the size of one local float32
block of logits rows, the quantity the all-gather loss materialises; "compile" is the wall time
of lowering + compiling that cell on this machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from vlm_jax import aot, losses, parallel  # noqa: E402

VARIANTS = {  # label -> (loss, variant)
    "softmax gather": ("softmax", "gather"),
    "softmax ring": ("softmax", "ring"),
    "softmax chunked": ("softmax", "chunked"),
    "softmax ring_recompute": ("softmax", "ring_recompute"),
    "sigmoid ring": ("sigmoid", "ring"),
    "sigmoid ring_recompute": ("sigmoid", "ring_recompute"),
    "sigmoid gather": ("sigmoid", "gather"),
}


def temp_bytes(mesh, name: str, variant: str, batch: int, dim: int,
               chunk_size: int = losses.DEFAULT_CHUNK_SIZE) -> tuple[int | None, str]:
    """(temporaries in bytes, note) of loss+grad for one setting; None if it did not compile."""
    x = jax.ShapeDtypeStruct((batch, dim), jnp.bfloat16,
                             sharding=NamedSharding(mesh, parallel.batch_spec(2)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    if name == "softmax":
        kw = {"chunk_size": chunk_size} if variant == "chunked" else {}
        fn = functools.partial(losses.contrastive_loss, mesh=mesh, variant=variant, **kw)
        args = (x, x, scalar)
    else:
        fn = functools.partial(losses.sigmoid_loss, mesh=mesh, variant=variant)
        args = (x, x, scalar, scalar)
    vg = jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0], argnums=tuple(range(len(args)))))
    try:
        compiled = vg.lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except
        m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
        if m:
            unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
            return int(float(m.group(1)) * unit), "OOM"
        return None, str(e).splitlines()[0][:60]
    return int(compiled.memory_analysis().temp_size_in_bytes), ""


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topologies", nargs="+", default=["v5e:8x8", "v5e:16x16"])
    p.add_argument("--batches", nargs="+", type=int, default=[32768, 131072, 1048576])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=losses.DEFAULT_CHUNK_SIZE,
                   help="columns per block of the chunked softmax loss")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   metavar="VARIANT", help=f"subset of {list(VARIANTS)}")
    args = p.parse_args(argv)
    hbm = {t: aot.CHIPS[aot.parse_topology(t)[0]].hbm_bytes for t in args.topologies}
    hbm_note = "/".join(sorted({f"{v // 2**30} GiB" for v in hbm.values()}))
    print(f"| variant | devices | global batch | local b | one b x B f32 block | temporaries per "
          f"device (of {hbm_note} HBM) | compile |")
    print("|---|---|---|---|---|---|---|")
    for topo in args.topologies:
        devices, _, _ = aot.topology_devices(topo)
        mesh = parallel.create_mesh({"data": -1}, devices)
        n = len(devices)
        print(f"{topo}: {n} devices", file=sys.stderr, flush=True)
        for label in args.variants:
            name, variant = VARIANTS[label]
            if variant == "chunked":
                label = f"{label} ({args.chunk_size})"
            for batch in args.batches:
                b = batch // n
                t0 = time.perf_counter()
                got, note = temp_bytes(mesh, name, variant, batch, args.dim, args.chunk_size)
                secs = time.perf_counter() - t0
                shown = "-" if got is None else _fmt(got)
                if note == "OOM":
                    shown = f"{shown} (does not fit: compiler's requirement)"
                elif note:
                    shown = f"error: {note}"
                print(f"| {label} | {n} | {batch:,} | {b:,} | {_fmt(b * batch * 4)} | {shown} "
                      f"| {secs:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
