"""CLIP towers at batch 32,768 on 256-chip TPU slices, planned by ahead-of-time compilation.

    python benchmarks/clip_pods.py                 # the table of docs/benchmarks.md
    python benchmarks/clip_pods.py --towers B/32 --topologies v5e:16x16

Each cell runs ``vlm-jax compile --config experiments/clip_openai.py:<tower> --topology <t>``
in a subprocess (libtpu, no TPU needed) with ``--json``, first without rematerialisation and,
if that does not fit, with ``model.remat=full``; it reports the lightest setting that fits, the
per-chip peak memory, the predicted step time at 50 % MFU and the compile time here. The last
row is ViT-L/14 at batch 1,048,576 with the chunked contrastive loss. Every cell is one
micro-batch (``--grad_accum_steps 1``); benchmarks/clip_planner.py lets the planner pick the
micro-batch count.
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


def compile_once(tower: str, topology: str, overrides: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "vlm_jax.main", "compile", "--config",
               f"experiments/clip_openai.py:{tower}", "--topology", topology, "--json", out,
               "--grad_accum_steps", "1", *[f"--config.{o}" for o in overrides]]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"fits": None, "error": f"compile timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t
        if not os.path.exists(out):
            return {"fits": None, "error": (proc.stderr or proc.stdout)[-300:]}
        with open(out, encoding="utf-8") as f:
            r = json.load(f)
        r["wall_seconds"] = wall
        return r


def cell(tower: str, topology: str, extra: list[str], timeout: float) -> tuple[str, dict]:
    r = {}
    for remat in ("none", "full"):
        r = compile_once(tower, topology, [f"model.remat={remat}", *extra], timeout)
        if r.get("fits"):
            return remat, r
    return "-", r


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--towers", nargs="+", default=["B/32", "B/16", "L/14", "H/14"])
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES.values()))
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--skip_1m", action="store_true", help="skip the L/14 batch-1M row")
    args = p.parse_args(argv)
    names = {v: k for k, v in TOPOLOGIES.items()}
    print("| model | batch | loss | slice | fits | remat | peak HBM per chip | params+opt per chip "
          "| step at 50% MFU | images/s at 50% MFU | compile here |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(t, 32768, "gather", []) for t in args.towers]
    if not args.skip_1m:
        rows.append(("L/14", 1048576, "chunked", ["batch_size=1048576", "loss.variant=chunked",
                                                  "loss.chunk_size=8192"]))
    for tower, batch, loss, extra in rows:
        for topo in args.topologies:
            remat, r = cell(tower, topo, extra, args.timeout)
            if r.get("fits") is None and "hbm_bytes" not in r:
                print(f"| ViT-{tower} | {batch:,} | {loss} | {names.get(topo, topo)} | error: "
                      f"{r.get('error', '')[:80]} |||||||", flush=True)
                continue
            per_chip = max(1, r["devices"] // r["chips"])
            peak = r.get("peak_bytes")
            used = peak if peak is not None else (r["param_bytes"] + r["opt_bytes"] +
                                                  r.get("batch_bytes", 0))
            hbm_chip = r["hbm_bytes"] * per_chip
            mem = f"{used * per_chip / 2**30:.1f} / {hbm_chip / 2**30:.0f} GiB"
            if peak is None:
                mem = "> " + mem
            state = (r["param_bytes"] + r["opt_bytes"]) * per_chip / 2**30
            t50 = r["step_seconds_at_50_mfu"]
            fits = "yes" if r["fits"] else ("no (compiler OOM)" if r["stage"] == "compile-oom"
                                            else "no")
            print(f"| ViT-{tower} | {batch:,} | {loss} | {names.get(topo, topo)} | {fits} | "
                  f"{remat} | {mem} | {state:.2f} GiB | {t50 * 1e3:,.0f} ms | "
                  f"{batch / t50:,.0f} | {r.get('wall_seconds', 0):.0f} s |", flush=True)


if __name__ == "__main__":
    main()
