"""Config loading: overrides keep types, unknown keys fail naming the key, CLI fails early."""
import subprocess
import sys
import time

import pytest

from vlm_jax import config as config_lib

TINY = "experiments/clip_tiny.py"


def test_override_types(repo_root):
    c = config_lib.load_config(str(repo_root / TINY), ["total_steps=7", "optim.lr=2e-4",
                                                       "model.dtype=bfloat16", "mesh.fsdp=2",
                                                       "checkpoint.async_save=false"])
    assert c.total_steps == 7 and isinstance(c.total_steps, int)
    assert c.optim.lr == pytest.approx(2e-4)
    assert c.model.dtype == "bfloat16"
    assert c.mesh.fsdp == 2
    assert c.checkpoint.async_save is False


@pytest.mark.parametrize("override, expected", [
    ("no_such_key=1", "'no_such_key'"),
    ("model.imgae.width=3", "Did you mean 'model.image'"),
    ("total_steps=abc", "expects int"),
    ("optim=3", "group of settings"),
    ("total_steps", "has no '='"),
])
def test_bad_overrides_name_the_key(repo_root, override, expected):
    with pytest.raises(config_lib.ConfigError, match=expected):
        config_lib.load_config(str(repo_root / TINY), [override])


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load_config("experiments/does_not_exist.py")


def test_config_is_locked(repo_root):
    c = config_lib.load_config(str(repo_root / TINY))
    with pytest.raises(AttributeError):
        c.new_field = 1


def test_cli_unknown_key_fails_before_compute(repo_root, tmp_path):
    """`vlm-jax train --config.no_such_key=1` exits 2 naming the key, writes nothing."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "train", "--config", str(repo_root / TINY),
         "--workdir", str(tmp_path / "run"), "--config.no_such_key=1"],
        capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no_such_key" in proc.stderr
    assert not (tmp_path / "run").exists()  # Nothing was created: no compute happened.
    assert time.perf_counter() - start < 60


def test_config_diff():
    saved = {"model": {"width": 8, "depth": 2}, "seed": 0}
    now = {"model": {"width": 16, "depth": 2}, "seed": 0}
    assert config_lib.diff(saved, now) == [("model.width", 8, 16)]
