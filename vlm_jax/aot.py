"""Ahead-of-time planning of a training run for a TPU topology, on any machine with ``libtpu``.

    vlm-jax compile --config experiments/clip_openai.py:B/16 --topology v5e:16x16

``jax.experimental.topologies`` describes a TPU slice (``v5e:16x16`` = 256 chips) without any
TPU attached; the *same* train step as ``vlm-jax train`` (mesh from ``config.mesh``, parameter
shardings from ``config.axis_rules``, donation, remat, the configured loss) is lowered on that
mesh and compiled by the TPU compiler. The report gives, per device:

* parameter and optimizer-state bytes (from the shardings: the bytes of each array's shard),
* the compiler's buffer assignment: arguments, outputs, donated (aliased) bytes and temporaries
  (activations kept for the backward pass, gradients, collectives' buffers), and the peak
  ``arguments + outputs - aliased + temporaries`` against the chip's HBM,
* FLOPs per step of the compiled program (its matrix products, every loop counted by its trip
  count: :func:`hlo_matmul_flops`) next to the analytic model FLOPs (``3 x forward`` per
  example) and the ratio the configuration should give (remat, gradient caching), and the step
  time and images/s this predicts at 100 % and 50 % MFU of the chip's peak bf16 FLOP/s.

When the step does not fit in one pass, ``--grad_accum_steps auto`` (:func:`plan`) searches the
number of micro-batches the step is computed in (``config.optim.grad_accum_steps``; the batch
and the update stay the same, contrastive families keep every negative) and reports the
smallest that fits. A setting that cannot fit exits non-zero with suggestions computed from
these numbers. A cheap analytic pre-check (parameters + optimizer state + input batch per device
against HBM) rejects hopeless settings before the compile, which can take minutes for large
models on large slices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

# libtpu takes a machine-wide lock unless told otherwise; compiling is safe to run in parallel
# (tests, the benchmark table), and there is no TPU metadata server to ask on a CPU machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from vlm_jax import parallel
from vlm_jax.config import ConfigError
from vlm_jax.families import get_family

GiB = 1024 ** 3

# Exit code of `vlm-jax compile` when the configuration does not fit.
EXIT_DOES_NOT_FIT = 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures of a TPU generation (Cloud TPU documentation)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    topology_kwargs: tuple = ()  # extra get_topology_desc arguments (v4: one device per chip)


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, (("chip_config_name", "megacore"),)),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
}


def parse_topology(spec: str) -> tuple[str, tuple[int, ...]]:
    """``'v5e:16x16'`` -> ``('v5e', (16, 16))``; raises ValueError naming the valid forms."""
    m = re.fullmatch(r"\s*(v\d+[a-z]*)\s*:\s*(\d+(?:x\d+){1,2})\s*", spec or "")
    if not m:
        raise ValueError(f"--topology {spec!r}: expected <generation>:<chips per dimension>, e.g. "
                         f"v5e:16x16, v4:8x8x4, v5p:4x4x8, v6e:8x8 (generations {sorted(CHIPS)}).")
    gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
    if gen not in CHIPS:
        raise ValueError(f"--topology {spec!r}: unknown TPU generation {gen!r}; known: "
                         f"{sorted(CHIPS)}.")
    return gen, dims


def topology_devices(spec: str, num_slices: int = 1) -> tuple[list, Chip, int]:
    """Compile-only devices of ``num_slices`` slices of ``spec``; returns (devices, chip, chips)."""
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    gen, dims = parse_topology(spec)
    chip = CHIPS[gen]
    name = f"{gen}:{'x'.join(map(str, dims))}"
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            num_slices=num_slices, **dict(chip.topology_kwargs))
    except Exception as e:  # libtpu missing or the shape is not a valid slice of that chip.
        raise ValueError(
            f"--topology {spec!r} (num_slices={num_slices}): the TPU compiler rejected it: "
            f"{str(e).splitlines()[0][:300]}. Is libtpu installed (pip install -e '.[tpu]') and "
            "is this a valid slice shape for that generation?") from e
    return list(topo.devices), chip, math.prod(dims) * num_slices


def abstract_batch(config: ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch of ``config`` as sharded ShapeDtypeStructs (no data read):
    the family's batch spec (the shapes and dtypes ``vlm-jax train`` ships, uint8 images),
    leading dimension over the mesh's batch axes."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
                mesh, parallel.batch_spec(len(v.shape))))
            for k, v in get_family(config).batch_spec(config).items()}


def lower_train_step(s) -> jax.stages.Lowered:
    """The train step of a :class:`vlm_jax.train.TrainSetup` lowered on its mesh for the
    abstract state and batch: the program ``vlm-jax train`` runs, without any data or array."""
    from vlm_jax import train  # pylint: disable=import-outside-toplevel

    batch = abstract_batch(s.config, s.mesh)
    return train.make_train_step(s, batch).lower(s.abstract_state, batch)


def _shard_bytes(tree: Any) -> int:
    """Bytes per device of a tree of sharded ShapeDtypeStructs (largest shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


# --- FLOPs of the compiled program with loops counted by their trip counts --------------------
#
# XLA's cost analysis (``compiled.cost_analysis()['flops']``) counts the body of a while loop
# once: a scanned layer stack's layer and a micro-batch scan's micro-batch are each counted one
# time, so for the scanned, micro-batched steps `vlm-jax compile` plans its total is a fraction
# of the step's. XLA exposes no per-computation cost to Python, so the partitioned program's text
# (``compiled.as_text()``, per-device shapes) is walked here: the matrix-multiply FLOPs of every
# ``dot`` and ``convolution`` (what the analytic model FLOPs count), each computation counted
# as often as it runs (while bodies times the trip count read from their condition, fusions and
# calls once per call, the largest branch of a conditional).

_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
# The opcode: the first word after a space followed by '(' (layouts read ':T(8,128)(2,1)').
_HLO_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_HLO_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")


def _dims(shape: str) -> list[int] | None:
    m = _HLO_SHAPE.match(shape)
    if not m:
        return None
    return [int(d) for d in m.group(1).split(",") if d]


def _window_pairs(size_in: int, size_out: int, size_k: int, stride: int, pad_lo: int,
                  lhs_dilation: int, rhs_dilation: int) -> int:
    """(output position, kernel position) pairs of one spatial dimension of a convolution that
    read an input element rather than padding (as XLA's HloCostAnalysis counts them)."""
    o = np.arange(size_out)[:, None]
    k = np.arange(size_k)[None, :]
    i = o * stride + k * rhs_dilation - pad_lo
    valid = (i >= 0) & (i <= (size_in - 1) * lhs_dilation) & (i % lhs_dilation == 0)
    return int(valid.sum())


def _conv_flops(out, lhs, rhs, attrs: str) -> float:
    """2 x multiply-adds of an HLO ``convolution`` (TPU programs express most matrix products,
    batched ones included, as convolutions whose "spatial" dimensions are batch dimensions)."""
    m = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)[,\s]", attrs + " ")
    if out is None or lhs is None or rhs is None or not m:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    if not (len(lhs_l) == len(lhs) and len(rhs_l) == len(rhs) and len(out_l) == len(out)):
        return 0.0
    spatial = [c for c in out_l if c.isdigit()]
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}

    def per_dim(key, default):
        v = fields.get(key)
        return [default] * len(spatial) if v is None else v.split("x")

    strides = [int(x) for x in per_dim("stride", 1)]
    pads = [int(x.split("_")[0]) for x in per_dim("pad", "0_0")]
    lhs_d = [int(x) for x in per_dim("lhs_dilate", 1)]
    rhs_d = [int(x) for x in per_dim("rhs_dilate", 1)]
    pairs = 1
    for j, c in enumerate(spatial):
        pairs *= _window_pairs(lhs[lhs_l.index(c)], out[out_l.index(c)], rhs[rhs_l.index(c)],
                               strides[j], pads[j], lhs_d[j], rhs_d[j])
    macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * pairs
    return 2.0 * macs


def hlo_matmul_flops(hlo_text: str) -> tuple[float, int]:
    """``(flops, loops_without_trip_count)``: the FLOPs of the ``dot`` and ``convolution``
    instructions of an HLO module's text, every computation weighted by how often it runs.

    A while loop's trip count is the ``s32`` constant its condition compares the counter with
    (``lt``; the loops ``lax.scan`` / ``lax.map`` lower to count from 0). Loops whose condition
    has no such constant are counted once and reported in the second value.
    """
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HLO_COMPUTATION.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _HLO_INSTRUCTION.match(line)
        op = _HLO_OPCODE.search(m.group(2)) if m else None
        if op:
            comps[current].append((m.group(1), m.group(2)[:op.start()].strip(), op.group(1),
                                   m.group(2)[op.end():]))
    unknown = [0]
    memo: dict[str, float] = {}

    def trip_count(cond: str) -> int | None:
        seen, todo, consts, has_lt = set(), [cond], [], False
        while todo:
            c = todo.pop()
            if c in seen or c not in comps:
                continue
            seen.add(c)
            for _, shape, op, rest in comps[c]:
                if op == "constant" and shape.startswith("s32[]"):
                    consts.append(int(rest.split(")")[0]))
                if op == "compare" and "direction=LT" in rest:
                    has_lt = True
                todo += re.findall(r"calls=%?([^\s,}]+)", rest)
        return max(consts) if has_lt and consts else None

    def flops(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # Guards against recursion in a malformed module.
        shapes = {n: shape for n, shape, _, _ in comps.get(name, [])}
        total = 0.0
        for _, shape, op, rest in comps.get(name, []):
            out = _dims(shape)
            operands = re.findall(r"%([^\s,)]+)", rest.split(")")[0])
            if op == "dot" and out is not None and operands:
                lhs = _dims(shapes.get(operands[0], ""))
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if lhs is not None and m:
                    contract = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i)
                    total += 2.0 * math.prod(out) * contract
            elif op == "convolution" and out is not None and len(operands) > 1:
                total += _conv_flops(out, _dims(shapes.get(operands[0], "")),
                                     _dims(shapes.get(operands[1], "")), rest)
            if op == "while":
                body = re.search(r"body=%?([^\s,}]+)", rest)
                cond = re.search(r"condition=%?([^\s,}]+)", rest)
                n = trip_count(cond.group(1)) if cond else None
                if n is None:
                    unknown[0] += 1
                    n = 1
                total += n * flops(body.group(1)) if body else 0.0
            elif op == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", rest)
                if m:
                    total += max((flops(b.strip().lstrip("%")) for b in m.group(1).split(",")),
                                 default=0.0)
            else:
                for callee in re.findall(r"(?:calls|to_apply)=%?([^\s,}]+)", rest):
                    total += flops(callee)
        memo[name] = total
        return total

    if entry is None:
        return 0.0, 0
    return flops(entry), unknown[0]


@dataclasses.dataclass
class Report:
    """What ``vlm-jax compile`` found; all byte figures per device."""

    config_name: str
    topology: str
    num_slices: int
    chip: str
    chips: int
    devices: int
    mesh: dict
    batch_size: int
    hbm_bytes: int
    param_bytes: int
    opt_bytes: int
    n_params: int
    batch_bytes: int = 0
    stage: str = "compiled"  # or 'precheck' (not compiled) / 'compile-oom'
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    peak_bytes: int | None = None
    compiled_flops_per_device: float | None = None
    model_flops_per_step: float = 0.0
    peak_flops_per_chip: float = 0.0
    compile_seconds: float | None = None
    loss_logits_bytes: int = 0
    error: str | None = None
    suggestions: list = dataclasses.field(default_factory=list)
    # Micro-batching (config.optim.grad_accum_steps / grad_accum_mode, resolved for the family).
    grad_accum_steps: int = 1
    grad_accum_mode: str = "gradients"
    batch_shards: int = 1  # The batch's shards (mesh slice x data x fsdp): k divides their rows.
    remat: str = "none"
    # FLOPs of the compiled program with every loop (scanned layers, micro-batches) counted
    # trip-count times (hlo_matmul_flops: dots and convolutions); loops whose trip count could
    # not be read are counted once and numbered in loops_counted_once.
    compiled_matmul_flops_per_device: float | None = None
    loops_counted_once: int = 0
    # What the compiler asked for when it ran out of HBM ("Used X of Y hbm"), if it said.
    compiler_required_bytes: int | None = None
    # The micro-batch search of `vlm-jax compile --grad_accum_steps auto`: one entry per k
    # considered, {'k', 'result': 'fits' | 'does not fit' | 'compiler OOM' | 'skipped',
    # 'peak_bytes', 'temp_bytes', 'bound_bytes' (skipped: the lower bound that ruled it out),
    # 'compile_seconds'}; empty when k was given.
    search: list = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.error is None and self.used_bytes <= self.hbm_bytes

    @property
    def used_bytes(self) -> int:
        """The compiled peak, or before compiling the lower bound state + input batch."""
        if self.peak_bytes is not None:
            return self.peak_bytes
        return self.param_bytes + self.opt_bytes + self.batch_bytes

    @property
    def devices_per_chip(self) -> int:
        return max(1, self.devices // self.chips)

    @property
    def micro_batch_size(self) -> int:
        """Global examples per micro-batch (``batch_size / grad_accum_steps``)."""
        return self.batch_size // self.grad_accum_steps

    @property
    def expected_flops_ratio(self) -> float:
        """Hardware FLOPs over the model's ``3 x forward``: + one forward pass recomputed by
        ``remat=full`` in the backward pass, + one by gradient caching (``'embeddings'``
        micro-batching embeds every micro-batch once without activations, then again with).

        An upper bound for ``remat=full``: the backward pass of a scanned layer stack does not
        recompute each block's MLP output product (its output only feeds the residual stream,
        which the scan keeps as its carry), about a third of a block's matrix products, and no
        input gradient is computed for the patch embedding. CPU compiles of
        ``clip_tiny.py`` measure forward 1.000 x analytic, forward + backward without remat
        0.985 x ``3 x forward``, with scanned ``remat=full`` 1.200 x against this 1.33
        (docs/benchmarks.md, "Micro-batched CLIP at 32k-1M")."""
        extra = (self.remat == "full") + (self.grad_accum_steps > 1 and
                                          self.grad_accum_mode == "embeddings")
        return 1.0 + extra / 3

    def step_seconds(self, mfu: float) -> float:
        return self.model_flops_per_step / (self.chips * self.peak_flops_per_chip * mfu)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, step_seconds_at_100_mfu=self.step_seconds(1.0),
                 step_seconds_at_50_mfu=self.step_seconds(0.5),
                 micro_batch_size=self.micro_batch_size,
                 expected_flops_ratio=self.expected_flops_ratio)
        return d

    def to_text(self) -> str:
        def gib(x):
            if x is None:
                return "         -"
            return f"{x / GiB:8.2f} GiB" if abs(x) >= GiB / 10 else f"{x / 2**20:8.1f} MiB"

        hbm = self.hbm_bytes
        lines = [
            f"{self.config_name} on {self.topology}"
            + (f" x {self.num_slices} slices" if self.num_slices > 1 else "")
            + f": {self.chips} {self.chip} chips ({self.devices} devices), mesh {self.mesh}, "
              f"global batch {self.batch_size} ({self.batch_size / self.chips:g} per chip), "
              f"{self.n_params / 1e6:.1f}M parameters",
            f"micro-batches: {self.grad_accum_steps} of {self.micro_batch_size} "
            f"({self.micro_batch_size / self.chips:g} per chip)"
            + (f", grad_accum_mode={self.grad_accum_mode}"
               + (" (the loss over all the batch's embeddings: every negative kept)"
                  if self.grad_accum_mode == "embeddings" else "")
               if self.grad_accum_steps > 1 else " (no micro-batching)"),
            "",
            "memory per device                     bytes      % of HBM",
            f"  parameters (sharded)          {gib(self.param_bytes)}  {self._pct(self.param_bytes)}",
            f"  optimizer state (sharded)     {gib(self.opt_bytes)}  {self._pct(self.opt_bytes)}",
            f"  input batch (sharded)         {gib(self.batch_bytes)}  {self._pct(self.batch_bytes)}",
        ]
        if self.stage == "compiled":
            lines += [
                f"  arguments (state + batch)     {gib(self.argument_bytes)}  "
                f"{self._pct(self.argument_bytes)}",
                f"  outputs - donated (aliased)   {gib(self.output_bytes - self.alias_bytes)}",
                f"  temporaries (activations,     {gib(self.temp_bytes)}  "
                f"{self._pct(self.temp_bytes)}",
                "    gradients, collectives)",
                f"  peak                          {gib(self.peak_bytes)}  "
                f"{self._pct(self.peak_bytes)}   of {hbm / GiB:.1f} GiB HBM per device",
            ]
        elif self.stage == "compile-oom" and self.compiler_required_bytes:
            lines.append(f"  compiler's requirement        {gib(self.compiler_required_bytes)}  "
                         f"{self._pct(self.compiler_required_bytes)}")
        elif self.stage == "precheck":
            lines.append(f"  (not compiled: parameters, optimizer state and input batch alone "
                         f"exceed the {hbm / GiB:.1f} GiB of HBM per device)")
        if self.loss_logits_bytes:
            lines.append(f"  contrastive logits, gather  {gib(self.loss_logits_bytes)}  (one local "
                         "b x B float32 block; the loss keeps several)")
        lines += ["", "compute per step"]
        per_device_model = self.model_flops_per_step / self.devices
        lines.append(f"  model FLOPs (3 x forward)     {self.model_flops_per_step:.3e} total, "
                     f"{per_device_model:.3e} per device")
        if self.compiled_matmul_flops_per_device is not None:
            ratio = (self.compiled_matmul_flops_per_device / per_device_model
                     if per_device_model else 0)
            once = (f"; {self.loops_counted_once} loop(s) of unknown trip count counted once"
                    if self.loops_counted_once else "")
            lines.append(f"  compiled FLOPs (matmuls)      "
                         f"{self.compiled_matmul_flops_per_device:.3e} per device = "
                         f"{ratio:.2f} x model (expected {self.expected_flops_ratio:.2f}: "
                         f"remat={self.remat}, "
                         f"{self.grad_accum_steps} micro-batch(es){once})")
        if self.compiled_flops_per_device is not None:
            ratio = self.compiled_flops_per_device / per_device_model if per_device_model else 0
            lines.append(f"  XLA cost analysis FLOPs       {self.compiled_flops_per_device:.3e} "
                         f"per device = {ratio:.2f} x model (counts each loop body once: a scanned "
                         "layer stack's layer, one micro-batch)")
        for mfu in (1.0, 0.5):
            t = self.step_seconds(mfu)
            shown = f"{t * 1e3:9.1f} ms" if t < 10 else f"{t:9.1f} s "
            lines.append(f"  step time at {100 * mfu:3.0f}% MFU          {shown}  "
                         f"({self.batch_size / t:,.0f} images/s; peak "
                         f"{self.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16 per chip)")
        if self.compile_seconds is not None:
            lines.append(f"  compile time here             {self.compile_seconds:9.1f} s")
        if self.search:
            lines += ["", "micro-batch search (powers of two dividing the "
                      f"{self.batch_size // self.batch_shards} rows of each batch shard)"]
            for e in self.search:
                if e["result"] == "skipped":
                    what = (f"skipped: needs at least {gib(e['bound_bytes']).strip()} "
                            "(temporaries of the last compile scaled by its k / this k)")
                elif e.get("peak_bytes") is not None:
                    what = (f"{e['result']}: peak {gib(e['peak_bytes']).strip()}, temporaries "
                            f"{gib(e['temp_bytes']).strip()}")
                else:
                    what = e["result"] + (f": needs {gib(e['required_bytes']).strip()}"
                                          if e.get("required_bytes") else "")
                if e.get("compile_seconds") is not None:
                    what += f" (compiled in {e['compile_seconds']:.0f} s)"
                lines.append(f"  k={e['k']:<6d} {what}")
        lines.append("")
        if self.error:
            lines.append(f"DOES NOT FIT: {self.error}")
        elif self.fits:
            lines.append(f"FITS: peak {self._pct(self.peak_bytes or 0).strip()} of HBM"
                         + (f", in {self.grad_accum_steps} micro-batches of "
                            f"{self.micro_batch_size} (--config.optim.grad_accum_steps="
                            f"{self.grad_accum_steps})" if self.grad_accum_steps > 1 else "")
                         + ".")
        else:
            lines.append(f"DOES NOT FIT: needs {self.used_bytes / GiB:.2f} GiB per device"
                         + (" at least" if self.peak_bytes is None else "")
                         + f", the chip has {hbm / GiB:.1f} GiB.")
        if self.suggestions:
            lines.append("Suggestions:")
            lines += [f"  - {s}" for s in self.suggestions]
        return "\n".join(lines)

    def _pct(self, x):
        return f"{100 * x / self.hbm_bytes:6.1f}%" if x is not None else ""


def _next_micro_batch_count(k: int, rows: int) -> int | None:
    """The next power of two above ``k`` if it divides ``rows`` (a batch shard's rows), or None
    (no larger power of two divides it either)."""
    n = 2 ** k.bit_length()
    return n if n <= rows and rows % n == 0 else None


def _suggestions(r: Report, config: ConfigDict, searched: bool = False) -> list[str]:
    """Concrete changes, derived from where the memory goes. ``searched``: the micro-batch
    search already tried every useful count (no micro-batch suggestion then)."""
    out = []
    mesh = r.mesh
    state = r.param_bytes + r.opt_bytes
    temp = r.temp_bytes if r.temp_bytes is not None else 0
    contrastive = get_family(config).contrastive
    if state > 0.3 * r.hbm_bytes and mesh.get("fsdp", 1) < r.devices:
        out.append(f"shard parameters and optimizer state over more devices: "
                   f"--config.mesh.fsdp=-1 --config.mesh.data=1 (now fsdp={mesh.get('fsdp', 1)}; "
                   f"state is {state / GiB:.2f} GiB per device)")
    if r.batch_bytes > 0.25 * r.hbm_bytes:
        out.append(f"the input batch alone is {r.batch_bytes / GiB:.2f} GiB per device "
                   f"({r.batch_size // r.chips} examples per chip): a larger slice (--topology) or "
                   "more slices (--num_slices) for this batch size")
    if state > r.hbm_bytes and mesh.get("fsdp", 1) >= r.devices:
        out.append("the sharded state alone exceeds HBM even over every device: use a larger "
                   "slice (--topology), more slices (--num_slices), or a smaller model")
    if state <= r.hbm_bytes:
        if config.model.remat == "none":
            out.append("recompute activations in the backward pass: --config.model.remat=full "
                       "(or dots_with_no_batch_dims_saveable for less recompute)")
        if r.loss_logits_bytes > 0.05 * r.hbm_bytes and config.loss.variant != "chunked":
            out.append(f"the loss's local b x B logits take {r.loss_logits_bytes / GiB:.2f} GiB "
                       "per copy: --config.loss.variant=chunked (b x chunk_size blocks)")
        if config.model.dtype == "float32":
            out.append("compute in bfloat16: --config.model.dtype=bfloat16")
        if contrastive and r.grad_accum_steps > 1 and r.grad_accum_mode == "gradients":
            out.append("--config.optim.grad_accum_mode=embeddings: 'gradients' averages "
                       f"micro-batch losses, each over only its {r.micro_batch_size} negatives; "
                       "'embeddings' computes the loss over the whole batch")
        rows = r.batch_size // max(1, r.batch_shards)
        k = _next_micro_batch_count(r.grad_accum_steps, rows)
        if (temp > 0.5 * r.hbm_bytes or r.stage == "compile-oom") and k and not searched:
            # A step stays one update on batch_size examples; k only splits its computation.
            how = ("the loss still sees all {b} examples' embeddings, every negative kept "
                   "(grad_accum_mode=embeddings, one extra forward pass)" if contrastive else
                   "the same update, activations of {m} examples at a time")
            out.append(f"micro-batches: --config.optim.grad_accum_steps={k} (batch_size stays "
                       f"{r.batch_size}, {r.batch_size // k} examples per micro-batch; "
                       + how.format(b=r.batch_size, m=r.batch_size // k)
                       + "), or --grad_accum_steps auto to find the smallest count that fits")
    return out


# The TPU compiler's out-of-memory errors: "Ran out of memory in memory space hbm. Used 49.34G
# of 32.00G hbm.", "the total memory required for HLO temporaries (64.00G) exceeds ...",
# "Allocation (size=21474836480) would exceed memory (size=17179869184)" (one buffer alone).
_COMPILER_NEEDS = (re.compile(r"Used\s+([\d.]+)([KMGT]?)\S*\s+of\s+[\d.]+\S*\s+hbm", re.I),
                   re.compile(r"HLO temporaries\s*\(([\d.]+)([KMGT]?)\S*\)", re.I),
                   re.compile(r"Allocation\s*\(size=(\d+)()\)\s*would exceed", re.I))


def _compiler_required_bytes(msg: str) -> int | None:
    """A lower bound of the HBM the TPU compiler's out-of-memory error says the program needs,
    if it says."""
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    for pattern in _COMPILER_NEEDS:
        m = pattern.search(msg)
        if m:
            return int(float(m.group(1)) * scale[m.group(2).upper()])
    return None


def plan(config: ConfigDict, topology: str, num_slices: int = 1,
         compile_step: bool = True, grad_accum_steps: int | str | None = None) -> Report:
    """Builds the train step of ``config`` on ``topology`` and reports memory and FLOPs.

    ``grad_accum_steps``: None (``config.optim.grad_accum_steps`` as configured), an int (that
    many micro-batches), or ``'auto'``: the smallest power of two ``k`` dividing each batch
    shard's rows whose step fits, compiled in increasing order from
    ``config.optim.grad_accum_steps``; a ``k`` whose lower bound (the last compile's
    ``arguments + outputs - donated`` plus its temporaries scaled by ``k_last / k``: activations
    shrink with the micro-batch, buffers that do not shrink only make the bound looser) exceeds
    HBM is skipped without compiling, and the search stops when the temporaries no longer
    shrink. Contrastive families are micro-batched at the embeddings (every negative kept):
    ``'auto'`` never plans ``'gradients'`` accumulation for them. The report is that of the
    chosen ``k`` (or the last one tried), with the search in ``Report.search``.

    Raises:
        ConfigError: the topology or the mesh/batch does not fit the config.
    """
    try:
        devices, chip, chips = topology_devices(topology, num_slices)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:
        mesh = parallel.create_mesh(config.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh on {topology}: {e}") from e
    if grad_accum_steps is None:
        return _plan_one(config, topology, num_slices, devices, chip, chips, mesh, compile_step)
    if grad_accum_steps != "auto":
        try:
            k = int(grad_accum_steps)
        except (TypeError, ValueError):
            raise ConfigError(f"--grad_accum_steps {grad_accum_steps!r}: 'auto' or a number of "
                              "micro-batches >= 1.") from None
        return _plan_one(_with_micro_batches(config, k), topology, num_slices, devices, chip,
                         chips, mesh, compile_step)

    rows = config.batch_size // parallel.batch_shard_count(mesh)
    k = max(1, int(config.optim.grad_accum_steps))
    search, last, bound = [], None, None  # bound: (fixed bytes, temporaries x k) of a compile
    while k is not None and rows % k == 0:
        if bound is not None and bound[0] + bound[1] / k > last.hbm_bytes:
            search.append(dict(k=k, result="skipped", bound_bytes=int(bound[0] + bound[1] / k)))
            k = _next_micro_batch_count(k, rows)
            continue
        r = _plan_one(_with_micro_batches(config, k), topology, num_slices, devices, chip,
                      chips, mesh, compile_step)
        search.append(dict(k=k, result="fits" if r.fits else {"compile-oom": "compiler OOM"}.get(
                               r.stage, "does not fit"),
                           peak_bytes=r.peak_bytes, temp_bytes=r.temp_bytes,
                           required_bytes=r.compiler_required_bytes,
                           compile_seconds=r.compile_seconds, error=r.error))
        print(f"vlm-jax compile: {k} micro-batch(es): {search[-1]['result']}"
              + (f", peak {r.peak_bytes / GiB:.2f} GiB" if r.peak_bytes is not None else "")
              + (f" ({r.compile_seconds:.0f} s)" if r.compile_seconds else ""),
              file=sys.stderr, flush=True)  # Progress: each compile can take minutes.
        previous, last = last, r
        if r.fits or r.stage == "precheck":  # The pre-check does not depend on k.
            break
        if r.stage == "compiled":
            fixed = r.argument_bytes + r.output_bytes - r.alias_bytes
            if (previous is not None and previous.temp_bytes is not None
                    and r.temp_bytes >= 0.95 * previous.temp_bytes):
                search[-1]["result"] += " (temporaries no longer shrink: search stopped)"
                break
            bound = (fixed, r.temp_bytes * k)
        elif r.compiler_required_bytes:  # The compiler's figure, an upper bound on temps.
            fixed = r.param_bytes + r.opt_bytes + r.batch_bytes
            bound = (fixed, max(0, r.compiler_required_bytes - fixed) * k)
        k = _next_micro_batch_count(k, rows)
    if not search:  # config.optim.grad_accum_steps does not divide the shard's rows.
        return _plan_one(config, topology, num_slices, devices, chip, chips, mesh, compile_step)
    last.search = search
    if not last.fits and last.stage != "precheck":
        last.suggestions = _suggestions(last, _with_micro_batches(config, last.grad_accum_steps),
                                        searched=True)
    return last


def _with_micro_batches(config: ConfigDict, k: int) -> ConfigDict:
    """A copy of ``config`` computing each step in ``k`` micro-batches; contrastive families are
    split at the embeddings (gradient caching), never by averaging micro-batch losses."""
    c = ConfigDict(config.to_dict())
    c.optim.grad_accum_steps = int(k)
    if k > 1 and get_family(c).contrastive:
        c.optim.grad_accum_mode = "embeddings"
    return c


def _plan_one(config: ConfigDict, topology: str, num_slices: int, devices, chip: Chip,
              chips: int, mesh, compile_step: bool) -> Report:
    """:func:`plan` for the micro-batch count of ``config``."""
    from vlm_jax import train  # pylint: disable=import-outside-toplevel

    s = train.setup(config, mesh)
    k, mode = train.accumulation(config, s.family)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_state["params"]))
    bsz = config.batch_size
    shards = parallel.batch_shard_count(mesh)
    b_local = bsz // shards
    if b_local % k:
        raise ConfigError(f"config.optim.grad_accum_steps={k} does not divide the {b_local} rows "
                          f"of each of the {shards} batch shards (batch_size {bsz}): use a "
                          "divisor, e.g. a power of two.")
    # The all-gathered contrastive loss's local b x B float32 logits (families with embeddings).
    contrastive = "embed" in s.family.capabilities and config.loss.variant == "gather"
    logits = b_local * bsz * 4 if contrastive else 0
    r = Report(
        config_name=config.name, topology=topology, num_slices=num_slices,
        chip=chip.name, chips=chips, devices=len(devices), mesh=dict(mesh.shape), batch_size=bsz,
        hbm_bytes=chip.hbm_bytes // max(1, len(devices) // chips),
        param_bytes=_shard_bytes(s.abstract_state["params"]),
        opt_bytes=_shard_bytes(s.abstract_state["opt_state"]), n_params=n_params,
        model_flops_per_step=3 * s.family.train_flops_per_example(config) * bsz,
        peak_flops_per_chip=chip.peak_bf16_flops,
        loss_logits_bytes=logits, grad_accum_steps=k, grad_accum_mode=mode,
        batch_shards=shards, remat=str(config.model.remat))
    r.batch_bytes = _shard_bytes(abstract_batch(config, mesh))
    if r.used_bytes > r.hbm_bytes or not compile_step:
        r.stage = "precheck"
        r.suggestions = _suggestions(r, config)
        return r
    t0 = time.perf_counter()
    try:
        compiled = lower_train_step(s).compile()
    except Exception as e:  # pylint: disable=broad-except
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "memory" not in msg.lower():
            raise
        r.stage = "compile-oom"
        r.compile_seconds = time.perf_counter() - t0
        r.compiler_required_bytes = _compiler_required_bytes(msg)
        r.error = "the TPU compiler ran out of HBM: " + msg.splitlines()[0][:400]
        r.suggestions = _suggestions(r, config)
        return r
    r.compile_seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    r.argument_bytes = int(ma.argument_size_in_bytes)
    r.output_bytes = int(ma.output_size_in_bytes)
    r.alias_bytes = int(ma.alias_size_in_bytes)
    r.temp_bytes = int(ma.temp_size_in_bytes)
    r.peak_bytes = r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        r.compiled_flops_per_device = float(cost["flops"])
    try:
        r.compiled_matmul_flops_per_device, r.loops_counted_once = hlo_matmul_flops(
            compiled.as_text())
    except Exception:  # pylint: disable=broad-except  # An HLO text this parser misreads.
        r.compiled_matmul_flops_per_device = None
    if not r.fits:
        r.suggestions = _suggestions(r, config)
    return r


def run(config: ConfigDict, topology: str, num_slices: int = 1, json_path: str | None = None,
        grad_accum_steps: int | str | None = None) -> int:
    """``vlm-jax compile``: prints the report; returns 0 if it fits, else EXIT_DOES_NOT_FIT.
    ``grad_accum_steps``: as :func:`plan` (``'auto'``: search the micro-batch count)."""
    r = plan(config, topology, num_slices, grad_accum_steps=grad_accum_steps)
    print(r.to_text())
    if json_path:  # Local or gs://.
        from etils import epath  # pylint: disable=import-outside-toplevel

        epath.Path(json_path).write_text(json.dumps(r.to_json(), indent=2), encoding="utf-8")
    return 0 if r.fits else EXIT_DOES_NOT_FIT
