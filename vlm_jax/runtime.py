"""The multi-process runtime: whether and how to start ``jax.distributed``, and the decisions
every process must take together (stop on bad data, on an error one process met).

Starting the distributed runtime
--------------------------------
:func:`plan_distributed` decides, before any backend is initialised, in this order:

1. explicit flags (``--coordinator_address / --num_processes / --process_id``, as
   ``vlm_jax.launch_local`` passes them): initialise with them, CPU collectives over gloo;
2. a cluster that jax itself detects: jax's own ``ClusterEnv`` classes (``jax._src.clusters``)
   are asked in jax's order, so the decision is the one ``jax.distributed.initialize()`` would
   take with no arguments -- Open MPI, Slurm, a GKE TPU pod (``TPU_WORKER_HOSTNAMES`` /
   ``TPU_PROCESS_ADDRESSES`` + ``TPU_WORKER_ID``), a TPU VM pod started with
   ``gcloud compute tpus tpu-vm ssh --worker=all`` (the metadata server's
   ``agent-worker-number`` / ``worker-network-endpoints``), multislice (``MEGASCALE_*`` in the
   environment or in the metadata's ``tpu-env``), Kubernetes. If that cluster has more than one
   process, ``jax.distributed.initialize(cluster_detection_method=<name>)`` starts it;
3. otherwise (a laptop, a single-host TPU VM, a one-process cluster job): one process, no
   distributed runtime; SIGTERM / SIGINT are then caught by the process itself
   (``checkpoint.PreemptionWatcher``).

This follows the detection logic of jax 0.10.2 (``jax/_src/clusters/cluster.py``
``ClusterEnv.auto_detect_unset_distributed_params`` and ``cloud_tpu_cluster.py``); it calls
those classes rather than re-implementing them, so a later jax's detection is used as it is.
Only ``ClusterEnv._cluster_types`` (the registry jax fills as cluster classes are imported) and
``opt_in_only_method`` are relied on.

Agreed decisions
----------------
With several processes, a decision that one process takes alone leaves the others waiting in the
next collective until a timeout. :func:`global_counts` sums counters over processes (so every
process takes the bad-data decision from the same numbers) and :class:`StopAgreement` makes an
error one process meets the error of every process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """What :func:`initialize` does: ``source`` is ``'flags'``, ``'cluster'`` or ``'single'``."""

    initialize: bool
    source: str
    cluster: str | None = None  # jax's ClusterEnv name: 'gketpu', 'gcetpu', 'slurm', 'ompi', ...
    coordinator_address: str | None = None  # None: jax derives it from the cluster
    num_processes: int | None = None
    process_id: int | None = None

    def describe(self) -> str:
        """One line for logs: ``cluster gcetpu: process 2 of 4`` / ``single process``."""
        where = {"flags": "explicit flags", "cluster": f"cluster {self.cluster}",
                 "single": "no cluster detected"}[self.source]
        if not self.initialize:
            return f"{where}: single process, no distributed runtime"
        return f"{where}: process {self.process_id} of {self.num_processes}"


def detect_cluster():
    """The ``jax._src.clusters.ClusterEnv`` subclass jax would use, or None: the first one that
    is not opt-in (mpi4py is) and whose ``is_env_present()`` is true, in jax's order."""
    from jax._src import clusters  # pylint: disable=import-outside-toplevel

    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
        if env.opt_in_only_method:
            continue
        try:
            present = env.is_env_present()
        except Exception as e:  # pylint: disable=broad-except  # e.g. metadata server down
            log.warning("Cluster detection %s failed (%s); not using it.", env.__name__, e)
            present = False
        if present:
            return env
    return None


def plan_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> DistributedPlan:
    """Decides whether and how to start ``jax.distributed`` (see the module docstring).

    Raises:
        ConfigError: explicit flags that do not make a complete set and no cluster to fill in
            the rest.
    """
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator_address or num_processes is not None or process_id is not None:
        if None in (coordinator_address, num_processes, process_id) and detect_cluster() is None:
            raise ConfigError(
                "--coordinator_address, --num_processes and --process_id go together (got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}) unless a cluster "
                "jax detects supplies the rest; pass all three, or none on a Cloud TPU pod.")
        return DistributedPlan(True, "flags", None, coordinator_address, num_processes,
                               process_id)
    env = detect_cluster()
    if env is None:
        return DistributedPlan(False, "single")
    # The count and id come from the same classes jax.distributed.initialize() asks; the
    # coordinator address is left to jax (on TPU it waits for the worker's DNS name).
    try:
        count, pid = env.get_process_count(), env.get_process_id()
    except Exception as e:  # pylint: disable=broad-except  # jax reports it with its context.
        log.warning("Cluster %s detected but its size is unknown (%s); jax decides.", env.name, e)
        return DistributedPlan(True, "cluster", env.name)
    if count <= 1:  # A single-host TPU VM, a one-task job: nothing to coordinate.
        return DistributedPlan(False, "cluster", env.name, None, count, pid)
    return DistributedPlan(True, "cluster", env.name, None, count, pid)


def initialize(plan: DistributedPlan) -> None:
    """Starts ``jax.distributed`` as ``plan`` says (no-op for a single process). Must run before
    any jax backend is initialised."""
    if not plan.initialize:
        return
    import jax  # pylint: disable=import-outside-toplevel

    # Cross-process collectives of the CPU backend (local multi-process runs, CPU clusters); the
    # setting does not affect the TPU/GPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(plan.coordinator_address, plan.num_processes, plan.process_id,
                               cluster_detection_method=plan.cluster)
    log.info("jax.distributed: %s", plan.describe())


# -------------------------------------------------------------------------------------------
# Decisions all processes take together.
# -------------------------------------------------------------------------------------------


def _client():
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    return distributed.global_state.client


def global_counts(counts: Mapping[str, int], keys: tuple[str, ...]) -> dict[str, int]:
    """``counts`` summed over all processes, for ``keys`` (missing ones count 0).

    One small ``process_allgather`` (a device collective, so it scales to a pod like the train
    step's own collectives); every process gets the same numbers. One process: ``counts``.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    local = np.array([int(counts.get(k, 0)) for k in keys], np.int64)
    if jax.process_count() == 1:
        return dict(zip(keys, local.tolist()))
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    # Gathered as int32 (jax without x64), summed as int64: billions of samples over a pod.
    gathered = np.asarray(multihost_utils.process_allgather(local), np.int64)
    total = gathered.reshape(-1, len(keys)).sum(0)
    return dict(zip(keys, total.tolist()))


class AgreedStop(RuntimeError):
    """Raised on the processes that did not meet an error themselves (see StopAgreement)."""


class StopAgreement:
    """Makes an error that one process meets the error of every process, within seconds.

    The process that meets it calls :meth:`announce` before raising: the error (type name and
    ``process <i>: <message>``) is stored in the coordination service's key-value store (the one
    ``jax.distributed`` runs: no device collective, so it works while the others wait inside
    one); the first announcement wins, and the announcing processes raise the winning one. On
    every process a watcher thread waits on that key; :meth:`check` (called once per step: it
    reads a ``threading.Event``, nothing else) then raises the same error type with the same
    message. A process that cannot reach :meth:`check` because it waits in a collective that the
    failed process will never join prints the error as ``vlm-jax`` does and exits with the same
    code (``exit_codes``) after ``grace_s``: nothing it could still do would complete.

    One process (no coordination service): :meth:`announce` returns the error unchanged and
    :meth:`check` never raises.
    """

    KEY = "vlm_jax/stop"
    POLL_S = 1.0
    SHUTDOWN_S = 20.0

    def __init__(self, exit_codes: Mapping[type, int] | None = None, grace_s: float = 10.0,
                 command: str = "vlm-jax train"):
        import jax  # pylint: disable=import-outside-toplevel

        self._client = _client() if jax.process_count() > 1 else None
        self._process = jax.process_index()
        self._codes = dict(exit_codes or {})
        self._grace, self._command = grace_s, command
        self._event = threading.Event()  # An announcement arrived.
        self._handled = threading.Event()  # The main thread raises it (or its own).
        self._closed = threading.Event()
        self._message = ""
        self._thread = None
        if self._client is not None:
            self._thread = threading.Thread(target=self._watch, name="vlm_jax-stop-agreement",
                                            daemon=True)
            self._thread.start()

    def announce(self, error: BaseException) -> BaseException:
        """Tells every process that this one stops with ``error``; returns the error to raise:
        the first one announced by any process (type and message), or ``error`` itself with a
        single process or a type without an exit code (its traceback is then the useful part)."""
        if self._client is None:
            return error
        self._handled.set()
        if not self._event.is_set():
            try:
                self._client.key_value_set(
                    self.KEY, f"{type(error).__name__}|process {self._process}: {error}")
            except Exception:  # pylint: disable=broad-except  # Another process was first.
                pass
            try:
                self._message = self._client.blocking_key_value_get(self.KEY, 10_000)
            except Exception:  # pylint: disable=broad-except  # Coordination service gone.
                return error
        agreed = self._error()
        if isinstance(agreed, AgreedStop) or type(agreed) is type(error) and str(agreed) == str(
                error):
            return error
        return agreed

    def check(self) -> None:
        """Raises the announced error (same type name, same message) if there is one."""
        if self._event.is_set() and not self._handled.is_set():
            self._handled.set()
            raise self._error()

    def close(self) -> None:
        """Stops watching (the run ended, normally or not); returns within ``POLL_S``."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _error(self) -> BaseException:
        kind, _, message = self._message.partition("|")
        cls = next((c for c in self._codes if c.__name__ == kind), None)
        if cls is not None:
            try:
                return cls(message)
            except Exception:  # pylint: disable=broad-except  # A constructor of another form.
                pass
        return AgreedStop(f"{kind}: {message}")

    def _watch(self) -> None:
        # Long-polls of POLL_S: the thread must not sit inside the client's C++ call when the
        # interpreter exits (a daemon thread is then unwound by force and the process aborts),
        # so close() ends the poll and joins the thread.
        while True:
            try:
                value = self._client.blocking_key_value_get(self.KEY, int(self.POLL_S * 1000))
                break
            except Exception:  # pylint: disable=broad-except  # No announcement yet.
                if self._closed.is_set():
                    return
        if not self._message:
            self._message = value
        self._event.set()
        if self._closed.wait(self._grace) or self._handled.is_set():
            return
        # The main thread did not get to check(): it waits in a collective that the process that
        # failed will never join.
        error = self._error()
        print(f"{self._command}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        # Leave the coordination service in order first: the failed process waits for this one
        # at jax's shutdown barrier, and if this process (process 0 hosts the service) vanished
        # without it, that process would abort on the lost service instead of exiting with its
        # error. Bounded, in case a peer is really dead.
        import jax  # pylint: disable=import-outside-toplevel

        done = threading.Thread(target=jax.distributed.shutdown, daemon=True)
        done.start()
        done.join(timeout=self.SHUTDOWN_S)
        os._exit(self._codes.get(type(error), 1))  # pylint: disable=protected-access
