"""Traces a range of training steps with the JAX profiler (``config.profile``).

``config.profile = dict(start_step=S, num_steps=K)`` traces steps S .. S+K-1 (step numbers as
logged, 1-based) on process 0 with ``jax.profiler`` and writes the trace under
``<workdir>/profile/plugins/profile/<timestamp>/`` (``*.xplane.pb``, ``*.trace.json.gz``), where
TensorBoard's profile plugin and XProf find it: ``tensorboard --logdir <workdir>/profile``.
``num_steps=0`` (the default) traces nothing and costs nothing. Step 1 includes the compile:
start at 2 or later to see steady-state steps.
"""

from __future__ import annotations

import logging
import shutil
import tempfile

import jax
from etils import epath

from vlm_jax.config import ConfigError

log = logging.getLogger(__name__)


class StepProfiler:
    """Starts the trace before step ``start_step`` and stops it after step ``start_step+K-1``."""

    def __init__(self, config, workdir: epath.Path):
        spec = config.profile
        self.start = int(spec.start_step)
        self.stop = self.start + int(spec.num_steps) - 1
        if spec.num_steps and self.start < 1:
            raise ConfigError(f"config.profile.start_step={self.start}: steps are numbered from "
                              "1 (step 1 includes the compile; 2 or later shows steady state).")
        self.enabled = self.stop >= self.start and jax.process_index() == 0
        self.out = epath.Path(workdir) / "profile"
        self._local = None  # The directory jax.profiler writes into while tracing.

    def before_step(self, step: int) -> None:
        """Called before running the step that will be logged as ``step``."""
        if self.enabled and step == self.start and self._local is None:
            # The profiler writes through the local filesystem; a gs:// workdir gets the
            # files copied (through etils.epath) when the trace stops.
            remote = "://" in str(self.out)
            self._local = (epath.Path(tempfile.mkdtemp(prefix="vlm_jax_profile_")) if remote
                           else self.out)
            jax.profiler.start_trace(str(self._local))
            log.info("Profiling steps %d-%d into %s", self.start, self.stop, self.out)

    def after_step(self, step: int, outputs) -> None:
        """Called after step ``step`` was dispatched; ``outputs`` are waited for before stopping."""
        if self._local is not None and step >= self.stop:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a trace still running (the run ended or was preempted inside the range)."""
        if self._local is None:
            return
        jax.profiler.stop_trace()
        local, self._local = self._local, None
        if local != self.out:
            for f in local.rglob("*"):
                if f.is_file():
                    dst = self.out / f.relative_to(local)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(f.read_bytes())
            shutil.rmtree(local, ignore_errors=True)
        print(f"Profile of steps {self.start}-{self.stop} written to {self.out} "
              f"(tensorboard --logdir {self.out})")
