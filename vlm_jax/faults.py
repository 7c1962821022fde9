"""Fault injection for the reliability battery (``tests/reliability``); off unless asked for.

The battery runs the real ``vlm-jax train`` command and makes it fail the way production runs
fail. The faults that cannot be caused from outside the process at a precise moment are
requested with the environment variable ``VLM_JAX_FAULTS``, a comma-separated list of
``<fault>@<step>``:

* ``nan_loss@N``      -- the loss (and so every gradient) of step N (1-based) is NaN;
* ``kill_in_save@N``  -- the process SIGKILLs itself while the checkpoint of step N is being
  written: every file of it is on disk but orbax has not yet committed it (renamed the
  temporary directory into place), the last moment a kill can hit a save;
* ``data_error@N``    -- reading the batch of step N raises a DataError;
* ``eval_error@N``    -- the evaluation after step N raises a RuntimeError inside the evaluators.

``<fault>@<step>:p<i>`` limits a fault to process ``i`` (one host failing while the others run).

Preemption (SIGTERM), kills at a random step (SIGKILL), a full or unwritable disk and config
mismatches need no hook: the battery causes them from outside. With ``VLM_JAX_FAULTS`` unset
this module changes nothing and costs nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "VLM_JAX_FAULTS"
KNOWN = ("nan_loss", "kill_in_save", "data_error", "eval_error")


def requested() -> dict[str, int]:
    """``{'nan_loss': 5, ...}`` from ``$VLM_JAX_FAULTS`` (empty when unset).

    Raises:
        ValueError: an unknown fault name or a malformed entry (named).
    """
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        name, _, where = item.partition("@")
        step, _, process = where.partition(":p")
        if name not in KNOWN or not step.isdigit() or (process and not process.isdigit()):
            raise ValueError(f"{ENV}: bad entry {item!r}; use <fault>@<step>[:p<process>] with "
                             f"fault in {list(KNOWN)}.")
        if process:
            import jax  # pylint: disable=import-outside-toplevel

            if jax.process_index() != int(process):
                continue
        out[name] = int(step)
    return out


_REQUESTED = None


def maybe_fail(fault: str, step: int) -> None:
    """Raises the error of ``data_error`` / ``eval_error`` if it is requested for ``step``
    (called every step: reads a dict parsed once)."""
    global _REQUESTED  # pylint: disable=global-statement
    if _REQUESTED is None:
        _REQUESTED = requested()
    if _REQUESTED.get(fault) != step:
        return
    if fault == "data_error":
        from input_pipeline import DataError  # pylint: disable=import-outside-toplevel

        raise DataError(f"injected fault {fault}@{step} ({ENV})")
    raise RuntimeError(f"injected fault {fault}@{step} ({ENV})")


def nan_loss_step() -> int | None:
    """The step whose loss is made NaN, or None."""
    return requested().get("nan_loss")


def install_kill_in_save() -> None:
    """Arms ``kill_in_save@N``: SIGKILL just before orbax commits the checkpoint of step N."""
    step = requested().get("kill_in_save")
    if step is None:
        return
    # orbax commits a checkpoint by renaming its temporary directory to the step's name; the
    # hook sits on that rename (orbax internals: only armed by the battery).
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel

    cls = atomicity.AtomicRenameTemporaryPath
    original = cls.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *args, **kwargs)

    cls.finalize = finalize
