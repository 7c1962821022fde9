"""Preemption and Ctrl-C of a 2-process run (``vlm_jax.launch_local``, gloo).

A SIGTERM (a host's preemption notice) or SIGINT (Ctrl-C) delivered to ONE process, or to all of
them through the launcher, makes both processes save the same step and exit 0; running the same
command again resumes at that step, and the losses from there on equal those of an uninterrupted
2-process run (the reference, run once for the module).
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.e2e

TOTAL = 12


def _args(repo_root, shapes_data_dir, workdir):
    return ["train", "--config", str(repo_root / "experiments/clip_tiny.py") + ":test",
            "--workdir", str(workdir), f"--config.data.data_dir={shapes_data_dir}",
            f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
            "--config.checkpoint.every_steps=1000", "--config.checkpoint.async_save=false",
            "--config.eval.every_steps=0", "--config.eval.evaluators=[]"]


class Launch:
    """``python -m vlm_jax.launch_local`` with 2 processes, its output collected as it comes."""

    def __init__(self, repo_root, args):
        cmd = [sys.executable, "-u", "-m", "vlm_jax.launch_local", "--num_processes", "2",
               "--devices_per_process", "1", "--timeout", "300", "--", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=repo_root)
        self.lines, self.pids = [], {}
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.match(r"\[launch_local\] process (\d+): pid (\d+)", line)
            if m:
                self.pids[int(m[1])] = int(m[2])

    def wait(self, timeout=400):
        rc = self.proc.wait(timeout=timeout)
        self._pump.join(timeout=10)
        return rc

    @property
    def out(self):
        return "".join(self.lines)


def _losses(workdir):
    """Step -> train/loss, the last record of each step (a resumed run logs steps again)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


def _wait_for_step(workdir, step, launch, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launch.proc.poll() is not None:
            pytest.fail("the run ended before the signal:\n" + launch.out[-3000:])
        if (workdir / "metrics.jsonl").exists() and max(_losses(workdir) or [0]) >= step:
            return
        time.sleep(0.1)
    pytest.fail(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def reference(repo_root, shapes_data_dir, tmp_path_factory):
    """Losses of the uninterrupted 2-process run."""
    workdir = tmp_path_factory.mktemp("preemption_reference")
    run = Launch(repo_root, _args(repo_root, shapes_data_dir, workdir))
    assert run.wait() == 0, run.out[-3000:]
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    return losses


@pytest.mark.parametrize("sig,target", [("SIGTERM", 1), ("SIGINT", 1), ("SIGINT", "all")])
def test_signal_saves_the_same_step_everywhere_and_resumes(sig, target, reference, repo_root,
                                                           shapes_data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = _args(repo_root, shapes_data_dir, workdir)
    run = Launch(repo_root, args)
    _wait_for_step(workdir, 2, run)
    if target == "all":  # Ctrl-C in the launcher's terminal: forwarded to every process.
        run.proc.send_signal(getattr(signal, sig))
    else:  # One host preempted: the signal reaches process 1 only.
        os.kill(run.pids[target], getattr(signal, sig))
    assert run.wait() == 0, run.out[-3000:]  # Both processes exited 0.
    m = re.search(r"Preempted \(.*\) at step (\d+)", run.out)
    assert m, run.out[-3000:]
    saved = int(m[1])
    assert 2 <= saved < TOTAL
    ckpt = workdir / "checkpoints" / str(saved)
    # Both processes took part in the save of that step: one iterator state each.
    assert sorted(p.name for p in (ckpt / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert max(_losses(workdir)) == saved  # Nothing ran past the agreed step.
    if target == "all":
        return  # Resuming was checked by the one-process cases.

    again = Launch(repo_root, args)
    assert again.wait() == 0, again.out[-3000:]
    assert f"Resuming from checkpoint step {saved}" in again.out
    got = _losses(workdir)
    print(f"{sig} to process {target}: saved step {saved}; resumed losses "
          + ", ".join(f"{s}: {got[s]:.6f} (ref {reference[s]:.6f})"
                      for s in range(saved + 1, TOTAL + 1)))
    for step in range(saved + 1, TOTAL + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step
