"""Checkpointer: relative directories, restore onto shardings, shape mismatch named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import parallel
from vlm_jax.checkpoint import CheckpointError, Checkpointer


def test_relative_directory_save_restore_and_reshard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": jnp.arange(32.0).reshape(8, 4)}, "step": jnp.int32(3)}
    ckpt = Checkpointer("run/checkpoints", save_every_steps=1, async_save=False)
    assert ckpt.save(3, state, config={"a": 1}, force=True)
    ckpt.close()
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    # Restore on another mesh: the rows split over fsdp=4.
    mesh = parallel.create_mesh({"fsdp": 4, "data": 2})
    target = {"params": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                                   sharding=NamedSharding(mesh, P("fsdp")))},
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
    again = Checkpointer("run/checkpoints", save_every_steps=1, async_save=False)
    restored = again.restore(None, target)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(32.0).reshape(8, 4))
    assert restored["params"]["w"].sharding.spec == P("fsdp")
    assert again.saved_config() == {"a": 1}
    # A config that builds another shape: the parameter and both shapes are named.
    bad = dict(target, params={"w": jax.ShapeDtypeStruct((8, 5), jnp.float32)})
    with pytest.raises(CheckpointError, match=r"\['w'\].*\(8, 4\).*\(8, 5\)"):
        again.restore(None, bad)
    again.close()
