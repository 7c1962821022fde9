"""Device mesh, logical-axis rules and multi-host helpers.

Every parameter of a vlm_jax model carries *logical* axis names (``embed``, ``mlp``, ``heads``,
``vocab`` ...), stored by Flax NNX as the ``out_sharding`` metadata of the variable. A rules
table maps logical names to *mesh* axes. The mesh has four axes:

* ``slice``  -- across TPU slices (data-centre network); batch is split over it.
* ``data``   -- pure data parallelism: parameters replicated.
* ``fsdp``   -- batch split *and* parameters sharded (ZeRO-3 / FSDP).
* ``tensor`` -- Megatron-style tensor parallelism over ``mlp``, ``heads`` and ``vocab``.

Activations use their own logical names (``act_batch``, ``act_len``, ``act_embed``, ...) so that
the parameter dimension ``embed`` (sharded over ``fsdp``) and the activation feature dimension
(not sharded) are mapped independently, as MaxText does.

Sharding of a dimension whose size is not divisible by the product of its mesh axes falls back
to replication for that dimension (e.g. a 49408-entry vocabulary over ``tensor=3``), so every
model runs on every mesh; :func:`logical_to_mesh_spec` reports such fallbacks once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("slice", "data", "fsdp", "tensor")
BATCH_AXES = ("slice", "data", "fsdp")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),  # flattened patch pixels of the patch-embedding kernel
    ("pos", None),  # position index of position embeddings
    ("norm", None),  # LayerNorm scale/bias
    ("proj", None),  # output dimension of contrastive projections
    ("layers", None),  # stacked layer index of scanned blocks (scan_layers=True)
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    # KV caches of decoding ([layers,] batch, slots, kv heads, head dim): own names, so that a
    # decoding layout can differ from the training activations'.
    ("cache_batch", BATCH_AXES),
    ("cache_len", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)

log = logging.getLogger(__name__)


def create_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the global 4-axis mesh from a ``{axis: size}`` mapping.

    Missing axes default to 1; exactly one axis may be ``-1`` and absorbs the remaining devices.
    With ``slice > 1`` the devices are laid out with ``create_hybrid_device_mesh`` so that only
    the ``slice`` axis crosses the data-centre network.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}.")
    devices = list(jax.devices() if devices is None else devices)
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {free}.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(
                f"Mesh {dict(shape)}: {len(devices)} devices are not divisible by the product of the "
                f"fixed axes ({known}).")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"Mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are "
            "available; set one axis to -1 to absorb the rest.")
    dims = tuple(sizes[a] for a in MESH_AXES)
    if sizes["slice"] > 1:
        from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

        per_slice = (1,) + dims[1:]
        dcn = (sizes["slice"], 1, 1, 1)
        arr = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)
    else:
        try:
            from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

            arr = mesh_utils.create_device_mesh(dims, devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES)


def _rules_dict(rules: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    return dict(rules.items() if isinstance(rules, Mapping) else rules)


_warned: set[tuple] = set()


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> P:
    """Maps logical axis names to a mesh ``PartitionSpec``.

    Names absent from ``rules`` are replicated. A mesh axis is used at most once (later dims that
    ask for an axis already taken are replicated). With ``shape`` and ``mesh`` given, a dimension
    not divisible by its mesh-axes product is replicated instead of padded.
    """
    if not logical:
        return P()
    table = _rules_dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(logical):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if axes and shape is not None and mesh is not None:
            n = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % n:
                key = (tuple(logical), tuple(shape), axes)
                if key not in _warned:
                    _warned.add(key)
                    log.info("dim %d (%s, size %d) not divisible by mesh axes %s (%d): replicated",
                             i, name, shape[i], axes, n)
                axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _logical_axes_of(leaf: Any) -> tuple | None:
    """The logical axis names stored on an NNX variable (``sharding_names`` / ``out_sharding``)."""
    metadata = getattr(leaf, "get_metadata", None)
    if metadata is None:
        return None
    md = metadata()
    names = md.get("out_sharding", md.get("sharding_names", md.get("sharding")))
    return tuple(names) if names is not None else None


def state_shardings(state: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for an NNX ``State`` (or a pure dict of it) of abstract or real arrays.

    Reads each variable's logical axis names, maps them with ``rules`` and returns a pytree of the
    same structure as ``state.to_pure_dict()`` (plain nested dicts with NamedSharding leaves).
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        spec = logical_to_mesh_spec(_logical_axes_of(var), rules, value.shape, mesh)
        return NamedSharding(mesh, spec)

    mapped = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return mapped.to_pure_dict() if hasattr(mapped, "to_pure_dict") else mapped


# -------------------------------------------------------------------------------------------
# Activation sharding constraints.
# -------------------------------------------------------------------------------------------


class _Context(threading.local):
    mesh: Mesh | None = None
    rules: tuple = ()


_CTX = _Context()


@contextlib.contextmanager
def sharding_context(mesh: Mesh | None, rules) -> Iterator[None]:
    """Within this context :func:`constrain` emits sharding constraints on ``mesh``.

    Used around tracing of the train/eval step; outside it :func:`constrain` is the identity, so
    models run unchanged in tests and notebooks.
    """
    prev = (_CTX.mesh, _CTX.rules)
    _CTX.mesh, _CTX.rules = mesh, tuple(_rules_dict(rules).items()) if rules is not None else ()
    try:
        yield
    finally:
        _CTX.mesh, _CTX.rules = prev


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """Constrains activation ``x`` to the sharding of its logical axes (no-op without a mesh)."""
    if _CTX.mesh is None:
        return x
    if len(logical) != x.ndim:
        raise ValueError(f"constrain: {len(logical)} axis names {logical} for an array of shape "
                         f"{x.shape}.")
    spec = logical_to_mesh_spec(logical, _CTX.rules, x.shape, _CTX.mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(_CTX.mesh, spec))


# -------------------------------------------------------------------------------------------
# Batches.
# -------------------------------------------------------------------------------------------


def batch_spec(ndim: int) -> P:
    """PartitionSpec of a batch array: leading dimension over all batch axes."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_shard_count(mesh: Mesh) -> int:
    """Number of shards the global batch is split into."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of the batch into global ``jax.Array``s.

    Every process passes the rows it loaded (``global_batch / process_count`` of them); the
    result is sharded over the batch axes of ``mesh``.
    """
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        sharding = NamedSharding(mesh, batch_spec(v.ndim))
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless the global batch splits evenly over batch shards and processes."""
    n = batch_shard_count(mesh)
    if global_batch_size % n:
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by the {n} batch shards of mesh "
            f"{dict(mesh.shape)} (slice x data x fsdp); choose a multiple of {n}.")
    if global_batch_size % jax.process_count():
        raise ValueError(f"batch_size={global_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes.")


def split_microbatches(batch: Any, k: int, mesh: Mesh) -> Any:
    """``[B, ...]`` arrays (batch-sharded) -> ``[k, B / k, ...]``: micro-batch ``j`` holds, on
    every batch shard, rows ``[j b / k, (j + 1) b / k)`` of that shard's ``b`` rows, so splitting
    moves no data between devices and each micro-batch stays sharded over all batch axes.

    Every row appears in exactly one micro-batch; :func:`merge_microbatches` is the inverse
    (row order included). ``k`` must divide the per-shard batch ``b``.
    """
    n = batch_shard_count(mesh)

    def split(x):
        b = x.shape[0] // n
        if b % k:
            raise ValueError(f"{k} micro-batches do not divide the {b} rows of each of the {n} "
                             f"batch shards (global batch {x.shape[0]}).")
        tail = x.shape[1:]
        y = x.reshape(n, k, b // k, *tail)
        y = jax.lax.with_sharding_constraint(
            y, NamedSharding(mesh, P(BATCH_AXES, *([None] * (y.ndim - 1)))))
        y = jnp.swapaxes(y, 0, 1).reshape(k, n * (b // k), *tail)
        return jax.lax.with_sharding_constraint(
            y, NamedSharding(mesh, P(None, BATCH_AXES, *([None] * len(tail)))))

    return jax.tree.map(split, batch)


def merge_microbatches(stacked: Any, mesh: Mesh) -> Any:
    """The inverse of :func:`split_microbatches`: ``[k, B / k, ...]`` -> ``[B, ...]`` in the
    original row order, batch-sharded, without moving rows between devices."""
    n = batch_shard_count(mesh)

    def merge(y):
        k, m, *tail = y.shape
        x = y.reshape(k, n, m // n, *tail)
        x = jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (x.ndim - 2)))))
        x = jnp.swapaxes(x, 0, 1).reshape(k * m, *tail)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(x.ndim)))

    return jax.tree.map(merge, stacked)
