"""Where the CPU train step's time goes: XLA's per-op timings grouped by what the ops compute.

    python benchmarks/step_profile.py                      # tiny towers, batch 128
    python benchmarks/step_profile.py --models ViT-B/32 --batch 16 --steps 2
    XLA_FLAGS=--xla_cpu_use_xnnpack=false python benchmarks/step_profile.py   # compare options

Runs ``vlm_jax.train.make_train_step`` (as ``benchmarks/train_throughput.py``) under
``jax.profiler.trace`` with the CPU runtime's per-op trace events
(``--xla_cpu_enable_xprof_traceme``), then attributes every op's time through the compiled HLO:
matrix products (dots and the library-backed fusions that contain one) by kind; every other op
by the named scope it came from (``layer_norm``, ``attention``, ``activation``,
``contrastive_loss``, ``optimizer``, ``guard``: ``jax.named_scope`` in the model and the step),
with copies / transposes outside those scopes as layout changes. The two CPU threads run ops
concurrently, so op time summed over a step exceeds the step's wall time; the table gives each
group's share of the summed op time, and its milliseconds per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_TRACEME = "--xla_cpu_enable_xprof_traceme=true"
if _TRACEME not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _TRACEME).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import train_throughput  # noqa: E402

SCOPES = ("contrastive_loss", "optimizer", "guard", "layer_norm", "attention", "activation")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w-]*)\((.*)$")


def hlo_ops(hlo: str) -> dict[str, dict]:
    """``{instruction name: {'op', 'op_name', 'calls', 'kind'}}`` of a compiled HLO module."""
    ops, comps, comp = {}, collections.defaultdict(list), None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, _, op, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        kind = re.search(r'"kind":"(\w+)"', rest)
        ops[name] = dict(op=op, op_name=meta.group(1) if meta else "",
                         calls=calls.group(1) if calls else None,
                         kind=kind.group(1) if kind else "")
        comps[comp].append(op)
    for info in ops.values():  # A fusion is a matrix product when its computation has one.
        info["has_dot"] = info["calls"] is not None and any(
            o in ("dot", "convolution") for o in comps.get(info["calls"], ()))
    return ops


def category(name: str, info: dict | None) -> str:
    """The group of one executed op (see the module docstring)."""
    if info is None:
        return "runtime (outside the compiled ops)"
    if info["op"] in ("dot", "convolution") or info["has_dot"] or "ynn" in info["kind"] \
            or "xnn" in info["kind"] or info["op"] == "custom-call":
        return "matmuls (dot / library fusions)"
    op_name = info["op_name"]
    for scope in SCOPES:
        if f"/{scope}/" in op_name or op_name.endswith(f"/{scope}") or f"({scope})" in op_name:
            return {"contrastive_loss": "loss", "optimizer": "optimizer update (AdamW, clip)",
                    "guard": "non-finite guard (global norm, select)",
                    "layer_norm": "layer norms", "attention": "attention softmax and mask",
                    "activation": "MLP activation (GELU)"}[scope]
    if "copy" in name or "transpose" in name or info["op"] in ("copy", "transpose"):
        return "copies / transposes (layouts)"
    return "other elementwise (residual adds, biases, embeddings, casts)"


def profile(model: str, batch: int, steps: int) -> tuple[float, dict[str, float]]:
    """Median wall seconds per step and ``{group: op seconds per step}``."""
    _, step, state, b = train_throughput.make_step(model, batch)
    ops = hlo_ops(step.lower(state, b).compile().as_text())
    for _ in range(2):
        state, m = step(state, b)
        jax.block_until_ready(m)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                t = time.perf_counter()
                state, m = step(state, b)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
        path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    groups: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name in ops:
            groups[category(name, ops[name])] += e.get("dur", 0) / 1e6 / steps
    return float(np.median(times)), dict(groups)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny"])
    p.add_argument("--batch", type=int, default=0, help="default: tiny 128, others 16")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"# jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    for model in args.models:
        batch = args.batch or (128 if model == "tiny" else 16)
        wall, groups = profile(model, batch, args.steps)
        total = sum(groups.values())
        print(f"\n{model}, batch {batch}: {wall * 1e3:.0f} ms per step (wall), "
              f"{total * 1e3:.0f} ms of op time per step on 2 threads")
        print("| group | ms per step | share of op time |")
        print("|---|---|---|")
        for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {g} | {t * 1e3:.1f} | {100 * t / total:.1f}% |")


if __name__ == "__main__":
    main()
