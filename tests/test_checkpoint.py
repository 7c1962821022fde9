"""Checkpointer: relative directories, restore onto shardings, shape mismatch named, keep
policy, disk-space checks. The faults of whole runs are in tests/reliability/."""
import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import parallel
from vlm_jax.checkpoint import CheckpointError, Checkpointer, check_free_space, is_disk_full


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
    with pytest.raises(CheckpointError, match=r"params.w has shape \(8, 4\).*\(8, 5\)"):
        again.restore(None, bad)
    again.close()


def test_keep_last_n_plus_every_kth(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", save_every_steps=1, keep=2, keep_every_steps=4,
                        async_save=True)
    for step in range(1, 13):
        ckpt.save(step, {"w": jnp.full((2,), float(step))})
    ckpt.close()
    kept = sorted(int(p.name) for p in (tmp_path / "c").iterdir() if p.name.isdigit())
    assert kept == [4, 8, 11, 12]


def test_free_space_check_names_directory_and_sizes(tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(CheckpointError, match=r"Not enough disk space .* in .*run/checkpoints: "
                                              r"1.0 MiB free, 5.0 MiB needed"):
        check_free_space(tmp_path / "run" / "checkpoints", 5 * 2**20, "a checkpoint")
    check_free_space(tmp_path / "run", 2**19, "a checkpoint")  # Enough: no error.
    assert not (tmp_path / "run").exists()  # Checking creates nothing.


def test_disk_full_is_recognised_through_wrapping():
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(RuntimeError("other"))
