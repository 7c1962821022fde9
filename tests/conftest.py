"""Test configuration: 8 simulated CPU devices for every test (set before jax is imported)."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session, inherited by the `vlm-jax` subprocesses
# of the end-to-end tests: the same small config is compiled once, not once per run (a run of
# the test config takes 12 s instead of 27 s). Cached executables are the same code, so the
# bitwise comparisons between runs are unaffected.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"vlm_jax_tests_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  pylint: disable=wrong-import-position

jax.config.update("jax_threefry_partitionable", True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with a small shapes/32px (the `clip_tiny.py:test` config's dataset)."""
    from input_pipeline import shapes  # pylint: disable=import-outside-toplevel

    root = tmp_path_factory.getbasetemp() / "shapes_32px"
    shapes.prepare(root, config="32px", num_train=512, num_eval=128, process_index=0,
                   progress=False)
    return str(root)
