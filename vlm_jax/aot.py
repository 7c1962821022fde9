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
* FLOPs per step from the compiled cost analysis next to the analytic model FLOPs
  (``3 x forward`` per example), and the step time and images/s this predicts at 100 % and
  50 % MFU of the chip's peak bf16 FLOP/s.

A setting that cannot fit exits non-zero with suggestions computed from these numbers. A cheap
analytic pre-check (parameters + optimizer state per device against HBM) rejects hopeless
settings before the compile, which can take minutes for large models on large slices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

# libtpu takes a machine-wide lock unless told otherwise; compiling is safe to run in parallel
# (tests, the benchmark table), and there is no TPU metadata server to ask on a CPU machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax
import jax.numpy as jnp
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

    def step_seconds(self, mfu: float) -> float:
        return self.model_flops_per_step / (self.chips * self.peak_flops_per_chip * mfu)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, step_seconds_at_100_mfu=self.step_seconds(1.0),
                 step_seconds_at_50_mfu=self.step_seconds(0.5))
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
        if self.compiled_flops_per_device is not None:
            ratio = self.compiled_flops_per_device / per_device_model if per_device_model else 0
            lines.append(f"  compiled FLOPs (XLA cost)     {self.compiled_flops_per_device:.3e} per "
                         f"device = {ratio:.2f} x model (remat recompute > 1; a scanned layer "
                         "stack is counted once by XLA < 1)")
        for mfu in (1.0, 0.5):
            t = self.step_seconds(mfu)
            shown = f"{t * 1e3:9.1f} ms" if t < 10 else f"{t:9.1f} s "
            lines.append(f"  step time at {100 * mfu:3.0f}% MFU          {shown}  "
                         f"({self.batch_size / t:,.0f} images/s; peak "
                         f"{self.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16 per chip)")
        if self.compile_seconds is not None:
            lines.append(f"  compile time here             {self.compile_seconds:9.1f} s")
        lines.append("")
        if self.error:
            lines.append(f"DOES NOT FIT: {self.error}")
        elif self.fits:
            lines.append(f"FITS: peak {self._pct(self.peak_bytes or 0).strip()} of HBM.")
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


def _suggestions(r: Report, config: ConfigDict) -> list[str]:
    """Concrete changes, derived from where the memory goes."""
    out = []
    mesh = r.mesh
    state = r.param_bytes + r.opt_bytes
    temp = r.temp_bytes if r.temp_bytes is not None else 0
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
        if temp > 0.5 * r.hbm_bytes or r.stage == "compile-oom" or \
                r.batch_bytes > 0.25 * r.hbm_bytes:
            out.append(f"smaller micro-batches: --config.batch_size={config.batch_size // 2} "
                       "--config.optim.grad_accum_steps=2 (same samples per update, but each "
                       "contrastive loss then sees half the negatives)")
    return out


def plan(config: ConfigDict, topology: str, num_slices: int = 1,
         compile_step: bool = True) -> Report:
    """Builds the train step of ``config`` on ``topology`` and reports memory and FLOPs.

    Raises:
        ConfigError: the topology or the mesh/batch does not fit the config.
    """
    from vlm_jax import train  # pylint: disable=import-outside-toplevel

    try:
        devices, chip, chips = topology_devices(topology, num_slices)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:
        mesh = parallel.create_mesh(config.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh on {topology}: {e}") from e
    s = train.setup(config, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_state["params"]))
    bsz = config.batch_size
    shards = parallel.batch_shard_count(mesh)
    b_local = bsz // shards
    # The all-gathered contrastive loss's local b x B float32 logits (families with embeddings).
    contrastive = "embed" in s.family.capabilities and config.loss.variant == "gather"
    logits = b_local * bsz * 4 if contrastive else 0
    r = Report(
        config_name=config.name, topology=topology, num_slices=num_slices,
        chip=chip.name, chips=chips, devices=len(devices), mesh=dict(mesh.shape), batch_size=bsz,
        hbm_bytes=chip.hbm_bytes // max(1, len(devices) // chips),
        param_bytes=_shard_bytes(s.abstract_state["params"]),
        opt_bytes=_shard_bytes(s.abstract_state["opt_state"]), n_params=n_params,
        model_flops_per_step=3 * s.family.flops_per_example(config.model) * bsz,
        peak_flops_per_chip=chip.peak_bf16_flops,
        loss_logits_bytes=logits)
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
    if not r.fits:
        r.suggestions = _suggestions(r, config)
    return r


def run(config: ConfigDict, topology: str, num_slices: int = 1, json_path: str | None = None
        ) -> int:
    """``vlm-jax compile``: prints the report; returns 0 if it fits, else EXIT_DOES_NOT_FIT."""
    r = plan(config, topology, num_slices)
    print(r.to_text())
    if json_path:  # Local or gs://.
        from etils import epath  # pylint: disable=import-outside-toplevel

        epath.Path(json_path).write_text(json.dumps(r.to_json(), indent=2), encoding="utf-8")
    return 0 if r.fits else EXIT_DOES_NOT_FIT
