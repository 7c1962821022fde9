"""Checkpoints: an orbax CheckpointManager holding train state, data-iterator state and config.

Each step directory has three items:

* ``state``  -- the train state pytree (step, params, optimizer state), saved by every process
  (each writes its shards), restored onto any mesh by passing an abstract target with shardings;
* ``data``   -- the data-iterator state of each process (``process_<i>-of-<n>.json``: grain's
  state and the global stream position), so a resumed run sees the same batches, on the same
  or on another number of processes (:class:`DataIteratorHandler`);
* ``config`` -- the config as JSON, to detect changes that break resume.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a checkpoint still being written


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the config."""


def is_disk_full(e: BaseException) -> bool:
    """True if ``e`` or an exception it was raised from is 'no space left on device'."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def check_free_space(directory: epath.Path, needed_bytes: int, what: str) -> None:
    """Raises CheckpointError if the local filesystem of ``directory`` has less than
    ``needed_bytes`` free (remote paths, ``gs://``, are not checked)."""
    if "://" in str(directory):
        return
    probe = epath.Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(str(probe)).free
    if free < needed_bytes:
        raise CheckpointError(
            f"Not enough disk space for {what} in {directory}: {free / 2**20:.1f} MiB free, "
            f"{needed_bytes / 2**20:.1f} MiB needed. Free space there, choose another --workdir "
            "or lower config.checkpoint.keep.")


def _process_index_and_count(item: Any) -> tuple[int, int]:
    """The process an iterator reads for (a StreamIterator knows), else JAX's."""
    if hasattr(item, "process_count"):
        return item.process_index, item.process_count
    return jax.process_index(), jax.process_count()


class DataIteratorHandler:
    """Orbax handler of the ``data`` item: one ``process_<i>-of-<n>.json`` per process, as
    grain's own ``grain.checkpoint.CheckpointHandler`` writes, restorable on another number of
    processes.

    The training iterators (:class:`input_pipeline.pipeline.StreamIterator`) save grain's state
    together with the global stream position (``steps * global_batch_size``: the stream of every
    pipeline is the same whatever the process count, see that class). On restore:

    * the file of this process (same index and count) exists: grain's state is restored from
      it, bit-exact, as grain's handler does;
    * otherwise (the checkpoint was written by another number of processes, or this process's
      file is missing): the iterator continues at the global position read from the saved
      files, each process reading its share ``stream[position + i :: n]`` of the same batches
      an uninterrupted run sees.

    A position that cannot be re-mapped raises :class:`CheckpointError` naming the reason:
    files from before positions were recorded, another global batch size, a batch the new
    process count does not divide, or a stream that dropped bad samples before the checkpoint
    (its global position then depends on which process skipped what, not on the step alone).
    """

    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        item = item if item is not None else args.item
        index, count = _process_index_and_count(item)
        (epath.Path(directory) / f"process_{index}-of-{count}.json").write_text(
            json.dumps(item.get_state(), indent=1))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        item = item if item is not None else args.item
        step = getattr(args, "step", None)
        directory = epath.Path(directory)
        index, count = _process_index_and_count(item)
        own = directory / f"process_{index}-of-{count}.json"
        if own.exists():
            state = json.loads(own.read_text())
            if hasattr(item, "seek") and "iterator" not in state:  # Written before positions.
                _restore_legacy(state, item, step)
            else:
                item.set_state(state)
        elif hasattr(item, "seek"):
            position, saved_count = _resume_position(directory, item)
            item.seek(position)
            if index == 0:
                print(f"Data stream: checkpoint written by {saved_count} process(es), resumed "
                      f"on {count} at global position {position} (step "
                      f"{position // item.global_batch_size}); each process reads its share.")
        else:
            raise CheckpointError(f"{own} does not exist and this data iterator cannot be "
                                  "re-mapped; resume with the process count that wrote it.")
        item.start_prefetch()
        return item

    def structure(self, directory: epath.Path) -> Any:  # Required by orbax's interface.
        del directory

    def metadata(self, directory: epath.Path) -> Any:
        del directory

    def finalize(self, directory: epath.Path) -> None:
        del directory

    def close(self) -> None:
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    """Saves a data iterator's per-process state (``Checkpointer.save(data_iter=...)``)."""
    item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    """Restores (or re-maps) a data iterator; ``step`` is the checkpoint's step."""
    item: Any
    step: int | None = None


def _restore_legacy(grain_state: dict, item: Any, step: int | None) -> None:
    """Restores a state file holding grain's state only (written, on this process count,
    before positions were recorded): the iterator started at position 0 and took ``step``
    batches. Streams that drop samples restore grain's state; the others continue at position
    ``step * G``, which is the same point and stays right where the pipeline's grain state
    format changed since (the documents are now batched before the iterator)."""
    if step is None:
        raise CheckpointError("Restoring a data-iterator state without a global position "
                              "needs the checkpoint step.")
    position = step * item.global_batch_size
    if not item.tracks_positions:
        item.seek(position)
        return
    item.set_state({"position": position, "start": 0,
                    "next_position": position + item.process_index,
                    "global_batch_size": item.global_batch_size,
                    "process_index": item.process_index, "process_count": item.process_count,
                    "iterator": grain_state})


def _resume_position(directory: epath.Path, item: Any) -> tuple[int, int]:
    """The global position every process continues from, and the saved process count.

    Raises:
        CheckpointError: the saved states do not determine one exact global position for this
            iterator (see :class:`DataIteratorHandler`).
    """
    files = sorted(directory.glob("process_*-of-*.json"))
    _, count = _process_index_and_count(item)
    if not files:
        raise CheckpointError(f"{directory} holds no data-iterator state; restore an earlier "
                              "step, or delete this step to resume from the previous one.")
    first = json.loads(files[0].read_text())
    if "position" not in first:
        raise CheckpointError(
            f"{files[0]} was written before checkpoints recorded the global data position, so "
            f"it cannot be re-mapped onto {count} process(es): resume with the process count "
            f"that wrote it ({files[0].stem.split('-of-')[-1]}), save a checkpoint, then change.")
    saved_count, position = first["process_count"], first["position"]
    what = f"The checkpoint in {directory.parent} (written by {saved_count} process(es))"
    redo = f"resume with {saved_count} processes"
    if first["global_batch_size"] != item.global_batch_size:
        raise CheckpointError(
            f"{what} has global batch size {first['global_batch_size']}, the run now "
            f"{item.global_batch_size}: the stream position does not map onto other batches; "
            f"use batch_size={first['global_batch_size']}.")
    if item.global_batch_size % count:
        raise CheckpointError(
            f"{what}: the global batch {item.global_batch_size} does not divide by {count} "
            f"processes, so they cannot share its batches; use a process count dividing it, or "
            f"{redo}.")
    if not first.get("positional", True):
        raise CheckpointError(
            f"{what} read raw image-text pairs with grain workers (config.data.worker_count > "
            "0): each worker batches its own share of the stream, so the batches are not "
            f"consecutive stream positions and cannot be re-mapped onto {count} process(es). "
            f"{redo.capitalize()} (the count that wrote it); runs with worker_count=0 re-map.")
    if first.get("tracks_positions"):  # Per-process skipping: read every process's record.
        states = [json.loads(f.read_text()) for f in files]
        if len(states) != saved_count:
            raise CheckpointError(
                f"{what} has state files of {len(states)} of its {saved_count} processes; the "
                "position of a stream that drops bad samples needs all of them. Restore an "
                "earlier step or " + redo + ".")
        skipped = {s["process_index"]: (s["next_position"] - s["position"]
                                        - s["process_index"]) // saved_count for s in states}
        if any(skipped.values()):
            listed = ", ".join(f"process {i}: {n}" for i, n in sorted(skipped.items()) if n)
            raise CheckpointError(
                f"{what}: its processes skipped bad samples before step "
                f"{position // item.global_batch_size} ({listed}), each in its own share of "
                "the stream, so the global position is no longer a function of the step and "
                f"cannot be re-mapped exactly onto {count} process(es). {redo.capitalize()} "
                "(the count that wrote it), or restore a step from before the first skip.")
    return position, saved_count


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` (keep-N, async, interval)."""

    def __init__(self, directory: str | epath.Path, *, save_every_steps: int, keep: int = 3,
                 keep_every_steps: int | None = None, async_save: bool = True):
        self.directory = epath.Path(directory)
        if "://" not in str(directory):  # orbax wants absolute paths; runs often pass relative.
            self.directory = self.directory.resolve()
        # A save interrupted by a kill leaves '<step>.orbax-checkpoint-tmp-<t>': never restored
        # (latest_step only sees committed steps) and removed by orbax on start
        # (cleanup_tmp_directories); say so, so that nobody wonders where it went.
        self.removed_partial = []
        if jax.process_index() == 0 and self.directory.exists():
            self.removed_partial = sorted(p.name for p in self.directory.iterdir()
                                          if TMP_MARK in p.name)
            for name in self.removed_partial:
                print(f"Removing unfinished checkpoint {self.directory / name} (its save was "
                      "interrupted); the complete checkpoints are kept.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every_steps or None,
            save_interval_steps=max(1, save_every_steps),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(
                f"Cannot create checkpoint directory {self.directory}: {e}. Choose a writable "
                "--workdir.") from e

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, data_iter: Any = None, config: dict | None = None,
             force: bool = False) -> bool:
        """Saves ``state`` (and the data iterator / config) if ``step`` is due or ``force``."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = DataSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # An async save's error surfaces at the next save.
            self._raise_write_error(e, step)
            raise

    def _raise_write_error(self, e: BaseException, step: int | str) -> None:
        if is_disk_full(e):
            raise CheckpointError(
                f"Disk full while writing checkpoint {step} in {self.directory} ({e}). The "
                f"complete checkpoints are intact (latest: step {self.latest_step()}); free "
                "space and run the same command to resume from it.") from e

    def restore(self, step: int | None, abstract_state: Any, *, data_iter: Any = None) -> Any:
        """Restores the train state (onto the shardings of ``abstract_state``) and data iterator
        (re-mapped onto this run's processes when another number wrote it:
        :class:`DataIteratorHandler`).

        Raises CheckpointError naming the first parameter whose shape differs from the config,
        or why the data position cannot be re-mapped.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        self.check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and (self.directory / str(step) / "data").exists():
            items["data"] = DataRestore(data_iter, step)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Restores only the model parameters of checkpoint ``step`` (latest by default) onto the
        shardings of ``abstract_params``: no optimizer state is read, so evaluating needs a third
        of a training run's memory, and converted checkpoints (``vlm-jax convert``, parameters
        only) restore the same way."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        self.check_shapes(step, {"params": abstract_params})
        path = self.directory / str(step) / "state"
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or single,
                                           global_shape=x.shape, dtype=x.dtype), abstract_params)
        # partial_restore: the saved tree may also hold opt_state and step; only params are read.
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True))
        return restored["params"]

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config saved with ``step`` (latest by default), or None."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / "config").exists():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"]

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError naming the first entry of ``abstract_state`` that checkpoint
        ``step`` lacks or holds with another shape (reads metadata only, no arrays).

        Parameters are compared before optimizer state, so the message names a model weight.
        """
        path = self.directory / str(step) / "state"
        if not path.parent.exists():
            raise CheckpointError(f"No checkpoint of step {step} in {self.directory} (its steps: "
                                  f"{self.manager.all_steps()}); pass one of those.")
        try:
            meta = ocp.StandardCheckpointer().metadata(path).item_metadata
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"Checkpoint {path} is unreadable ({e}); restore an earlier "
                                  "step or use a new --workdir.") from e
        tree = getattr(meta, "tree", meta)
        saved = {_dotted(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
        leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        leaves.sort(key=lambda pl: not _dotted(pl[0]).startswith("params."))
        for p, leaf in leaves:
            key = _dotted(p)
            if key not in saved:
                raise CheckpointError(
                    f"Checkpoint {path.parent} has no entry {key} that the config's model needs: "
                    "it was written by a different model config. Use a new --workdir or the "
                    "config the checkpoint was written with.")
            shape = tuple(getattr(saved[key], "shape", ()) or ())
            if shape != tuple(leaf.shape):
                raise CheckpointError(
                    f"Checkpoint {path.parent}: parameter {key} has shape {shape} but the "
                    f"config builds {tuple(leaf.shape)}. Use the config the checkpoint was "
                    "written with, or a new --workdir.")

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._raise_write_error(e, "in flight")
            raise

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.wait()
        self.manager.close()


def _preemption_sync_manager():
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    return distributed.global_state.preemption_sync_manager


def _dotted(path: tuple) -> str:
    """A pytree path as ``params.image.cls_token`` (dict keys, attributes and indices alike)."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


class PreemptionWatcher:
    """Tells the train loop when to save and stop because the VM is being preempted (SIGTERM) or
    the user pressed Ctrl-C (SIGINT).

    Cloud TPU VMs get SIGTERM before preemption, and on a pod the hosts may get it at different
    steps, or only some of them. With several processes the decision goes through JAX's
    preemption sync manager (started by ``jax.distributed.initialize``): its notifier catches
    SIGTERM in C++ (xla/tsl ``SigtermNotifier``, SIGTERM only), tells the coordination service,
    and every process sees ``reached(step)`` true at the same step, so all save that step
    together even if one process alone got the signal. SIGINT is routed into the same path: the
    handler re-raises it to this process as SIGTERM (a second Ctrl-C interrupts at once, as
    usual). A single process catches SIGTERM and SIGINT itself.
    """

    def __init__(self):
        self.signal_name = None
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = {}
        if not self._multi:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        elif _preemption_sync_manager() is not None:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._sigint_to_sigterm)

    def _handler(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name
        self._flag.set()

    def _sigint_to_sigterm(self, signum, frame):
        if self._flag.is_set():  # Second Ctrl-C: the user does not want to wait for the save.
            signal.default_int_handler(signum, frame)
        self._handler(signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)  # Caught by JAX's preemption notifier.

    def reached(self, step: int) -> bool:
        """True once a preemption notice has arrived (at the same step on every process)."""
        if self._multi:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

            try:
                hit = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # Preemption service disabled: nothing to watch.
                return False
            if hit and self.signal_name is None:
                self.signal_name = "SIGTERM (here or on another process)"
            return hit
        return self._flag.is_set()

    def close(self) -> None:
        """Restores the previous signal handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
