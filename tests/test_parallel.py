"""Mesh construction and logical-axis mapping."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from vlm_jax import parallel


def test_mesh_fill_and_errors():
    mesh = parallel.create_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"slice": 1, "data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.create_mesh({"data": 4, "fsdp": 4})
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        parallel.create_mesh({"model": 2})


def test_logical_to_mesh_spec():
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.DEFAULT_RULES
    assert parallel.logical_to_mesh_spec(("embed", "mlp"), rules, (8, 16), mesh) == \
        P("fsdp", "tensor")
    # Size-1 mesh axes are dropped; batch goes over data x fsdp.
    assert parallel.logical_to_mesh_spec(("act_batch", "act_len", "act_embed"), rules,
                                         (8, 4, 4), mesh) == P(("data", "fsdp"))
    # Not divisible -> replicated rather than padded.
    assert parallel.logical_to_mesh_spec(("vocab", "embed"), rules, (49407, 8), mesh) == \
        P(None, "fsdp")
    # A mesh axis is used once per spec.
    assert parallel.logical_to_mesh_spec(("mlp", "heads"), rules, (8, 8), mesh) == P("tensor")


def test_batch_divisibility_message():
    mesh = parallel.create_mesh({"data": 8})
    with pytest.raises(ValueError, match="multiple of 8"):
        parallel.check_batch_divisible(12, mesh)


def test_make_global_batch_roundtrip():
    import numpy as np
    mesh = parallel.create_mesh({"data": 4, "fsdp": 2})
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = parallel.make_global_batch({"x": x}, mesh)["x"]
    assert g.shape == (16, 3) and len(g.sharding.device_set) == jax.device_count()
    np.testing.assert_array_equal(np.asarray(g), x)
