"""CLIP towers at batch 32k, 256k and 1M on 256-chip TPU slices: the micro-batch count
``vlm-jax compile`` picks, and what it costs.

    python benchmarks/clip_planner.py                        # the planner table, docs/benchmarks.md
    python benchmarks/clip_planner.py --towers L/14 --batches 1048576 --topologies v5p:8x8x4
    python benchmarks/clip_planner.py --sweep 1 2 4 8 --towers B/16 --batches 32768 \
        --topologies v5e:16x16                               # fixed micro-batch counts

Each cell runs ``vlm-jax compile --config experiments/clip_openai.py:<tower> --topology <t>
--config.batch_size=<B> --config.loss.variant=<loss> --grad_accum_steps auto`` in a subprocess
(libtpu, no TPU needed) with ``--json`` and prints one markdown row: whether it fits, the
micro-batch count the planner picked (``k x`` examples per chip per micro-batch), the compiled
per-chip peak and temporaries, the compiled FLOPs (matrix products, every loop counted by its
trip count) over the analytic model FLOPs (``3 x forward x batch``) next to the expected ratio
(+1/3 for ``remat=full``, +1/3 for gradient caching's extra forward pass), the predicted step
time at 50 % MFU and the wall time of the search here. ``--sweep`` compiles the given counts
instead of searching (one row each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOPOLOGIES = {"v4-256": "v4:8x8x4", "v5e-256": "v5e:16x16", "v5p-256": "v5p:8x8x4"}
GiB = 2 ** 30


def compile_report(tower: str, topology: str, batch: int, loss: str, accum: str,
                   extra: list[str], timeout: float) -> dict:
    """One ``vlm-jax compile`` in a subprocess; its JSON report (+ wall_seconds) or an error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "vlm_jax.main", "compile", "--config",
               f"experiments/clip_openai.py:{tower}", "--topology", topology, "--json", out,
               "--grad_accum_steps", accum, f"--config.batch_size={batch}",
               f"--config.loss.variant={loss}", *[f"--config.{o}" for o in extra]]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"failed": f"timed out after {timeout:.0f} s"}
        if not os.path.exists(out):
            return {"failed": (proc.stderr or proc.stdout)[-300:]}
        with open(out, encoding="utf-8") as f:
            r = json.load(f)
        r["wall_seconds"] = time.perf_counter() - t
        return r


def row(tower: str, batch: int, loss: str, slice_name: str, r: dict) -> str:
    """The markdown row of one report."""
    head = f"| ViT-{tower} | {batch:,} | {loss} | {slice_name} |"
    if "failed" in r:  # No report: the compile command itself failed.
        return head + f" error: {r['failed'][-100:].strip()} ||||||||"
    per_chip = max(1, r["devices"] // r["chips"])
    k = r["grad_accum_steps"]
    fits = "yes" if r["fits"] else {"compile-oom": "no (compiler OOM)",
                                    "precheck": "no (pre-check)"}.get(r["stage"], "no")
    peak = r.get("peak_bytes")
    if peak is None:
        peak = r.get("compiler_required_bytes")
        mem = f"{peak * per_chip / GiB:.1f} (compiler)" if peak else "-"
    else:
        mem = f"{peak * per_chip / GiB:.1f}"
    mem += f" / {r['hbm_bytes'] * per_chip / GiB:.0f} GiB"
    temp = r.get("temp_bytes")
    temp = f"{temp * per_chip / GiB:.1f} GiB" if temp is not None else "-"
    model_per_device = r["model_flops_per_step"] / r["devices"]
    flops = r.get("compiled_matmul_flops_per_device")
    flops = (f"{flops / model_per_device:.2f} ({r['expected_flops_ratio']:.2f})"
             if flops else "-")
    t50 = r["step_seconds_at_50_mfu"]
    tried = ", ".join(f"{e['k']}{'' if e['result'] != 'skipped' else ' skipped'}"
                      for e in r.get("search", [])) or str(k)
    return (head + f" {fits} | {k} x {r['micro_batch_size'] // r['chips']:,} | {mem} | {temp} | "
            f"{flops} | {t50:,.2f} s | {batch / t50:,.0f} | {tried} | "
            f"{r.get('wall_seconds', 0):.0f} s |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--towers", nargs="+", default=["B/16", "L/14", "H/14"])
    p.add_argument("--batches", nargs="+", type=int, default=[32768, 262144, 1048576])
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES.values()))
    p.add_argument("--loss", default="chunked", help="config.loss.variant (chunked, ring, gather)")
    p.add_argument("--sweep", nargs="+", default=None,
                   help="compile these micro-batch counts instead of searching")
    p.add_argument("--extra", nargs="*", default=[],
                   help="more config overrides, without --config. (e.g. model.remat=none)")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    names = {v: k for k, v in TOPOLOGIES.items()}
    print("| model | batch | loss | slice | fits | micro-batches (k x per chip) | peak per chip "
          "| temporaries | compiled / model FLOPs (expected) | step at 50% MFU "
          "| images/s at 50% MFU | k compiled | compile here |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tower in args.towers:
        for batch in args.batches:
            for topo in args.topologies:
                for accum in args.sweep or ["auto"]:
                    r = compile_report(tower, topo, batch, args.loss, accum, args.extra,
                                       args.timeout)
                    print(row(tower, batch, args.loss, names.get(topo, topo), r), flush=True)


if __name__ == "__main__":
    main()
