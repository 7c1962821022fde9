"""Checkpoints: an orbax CheckpointManager holding train state, data-iterator state and config.

Each step directory has three items:

* ``state``  -- the train state pytree (step, params, optimizer state), saved by every process
  (each writes its shards), restored onto any mesh by passing an abstract target with shardings;
* ``data``   -- the grain iterator state of each process, so a resumed run sees the same batches;
* ``config`` -- the config as JSON, to detect changes that break resume.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the config."""


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` (keep-N, async, interval)."""

    def __init__(self, directory: str | epath.Path, *, save_every_steps: int, keep: int = 3,
                 keep_every_steps: int | None = None, async_save: bool = True):
        self.directory = epath.Path(directory)
        if "://" not in str(directory):  # orbax wants absolute paths; runs often pass relative.
            self.directory = self.directory.resolve()
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
            import grain  # pylint: disable=import-outside-toplevel

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, abstract_state: Any, *, data_iter: Any = None) -> Any:
        """Restores the train state (onto the shardings of ``abstract_state``) and data iterator.

        Raises CheckpointError naming the first parameter whose shape differs from the config.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        self._check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and (self.directory / str(step) / "data").exists():
            import grain  # pylint: disable=import-outside-toplevel

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config saved with ``step`` (latest by default), or None."""
        step = self.latest_step() if step is None else step
        if step is None or not (self.directory / str(step) / "config").exists():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"]

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        meta = self.manager.item_metadata(step)
        saved = meta["state"] if meta is not None and "state" in meta else None
        if saved is None:
            return
        saved_flat = {jax.tree_util.keystr(p): v for p, v in
                      jax.tree_util.tree_flatten_with_path(saved)[0]}
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            key = jax.tree_util.keystr(path)
            if key not in saved_flat:
                raise CheckpointError(
                    f"Checkpoint {self.directory / str(step)} has no entry {key} that the config's "
                    "model needs: it was written by a different model config. Use a new --workdir "
                    "or the config the checkpoint was written with.")
            shape = tuple(getattr(saved_flat[key], "shape", ()) or ())
            if shape != tuple(leaf.shape):
                raise CheckpointError(
                    f"Checkpoint {self.directory / str(step)}: parameter {key} has shape {shape} "
                    f"but the config builds {tuple(leaf.shape)}. Use the config the checkpoint "
                    "was written with, or a new --workdir.")

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
