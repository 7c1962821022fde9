"""Preemption and Ctrl-C of a 2-process run (``vlm_jax.launch_local``, gloo).

A SIGTERM (a host's preemption notice) or SIGINT (Ctrl-C) delivered to ONE process makes both
processes save the same step and exit 0; running the same command again resumes at that step, and
the losses from there on equal those of an uninterrupted 2-process run (the reference, run once
for the module). The signal to all processes (through the launcher) is the reliability battery's
``sigterm_two_processes``; SIGINT there takes the same handler as here.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.runs import train_losses

pytestmark = pytest.mark.e2e

TOTAL = 100  # Steps of ~0.05 s: the processes agree on a step ~1 s after the signal.


def _args(repo_root, shapes_data_dir, workdir):
    return ["train", "--config", str(repo_root / "experiments/clip_tiny.py") + ":test",
            "--workdir", str(workdir), f"--config.data.data_dir={shapes_data_dir}",
            f"--config.total_steps={TOTAL}", "--config.log_every_steps=1",
            "--config.checkpoint.every_steps=1000", "--config.checkpoint.async_save=false",
            "--config.evals={}"]


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


_losses = train_losses


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


def _interrupt(repo_root, args, workdir, sig, target, after_step):
    """Runs until ``after_step`` is logged, sends ``sig`` to process ``target`` (or to the
    launcher: 'all'), checks that both processes saved the same step and exited 0; returns it."""
    run = Launch(repo_root, args)
    _wait_for_step(workdir, after_step, run)
    if target == "all":  # Ctrl-C in the launcher's terminal: forwarded to every process.
        run.proc.send_signal(getattr(signal, sig))
    else:  # One host preempted: the signal reaches that process only.
        os.kill(run.pids[target], getattr(signal, sig))
    assert run.wait() == 0, run.out[-3000:]  # The launcher: 0 only if both processes exit 0.
    assert re.findall(r"process (\d) exited with code (-?\d+)", run.out) != []
    assert all(c == "0" for _, c in re.findall(r"process (\d) exited with code (-?\d+)",
                                                run.out)), run.out[-3000:]
    m = re.search(r"Preempted \(.*\) at step (\d+)", run.out)
    assert m, run.out[-3000:]
    saved = int(m[1])
    assert after_step <= saved < TOTAL
    # Both processes took part in the save of that step: one iterator state each.
    ckpt = workdir / "checkpoints" / str(saved)
    assert sorted(p.name for p in (ckpt / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"], list((ckpt / "data").iterdir())
    assert max(_losses(workdir)) == saved  # Nothing ran past the agreed step.
    return run, saved


@pytest.mark.slow  # 2 minutes; the battery's 2-process SIGTERM test covers the agreed save.
def test_signals_to_one_process_save_the_same_step_everywhere_and_resume(
        reference, repo_root, shapes_data_dir, tmp_path):
    """SIGTERM to process 1 -> both save step a, exit 0; the same command resumes at a; SIGINT
    (Ctrl-C) to process 1 of that run -> both save b; the next run resumes at b and finishes.
    Every logged loss after a resume equals the uninterrupted run's."""
    workdir = tmp_path / "run"
    args = _args(repo_root, shapes_data_dir, workdir)
    _, a = _interrupt(repo_root, args, workdir, "SIGTERM", 1, after_step=2)
    run, b = _interrupt(repo_root, args, workdir, "SIGINT", 1, after_step=a + 2)
    assert f"Resuming from checkpoint step {a}" in run.out
    last = Launch(repo_root, args)
    assert last.wait() == 0, last.out[-3000:]
    assert f"Resuming from checkpoint step {b}" in last.out
    got = _losses(workdir)  # The last record of each step: the one logged after each resume.
    diff = max(abs(got[s] - reference[s]) for s in range(a + 1, TOTAL + 1))
    print(f"\nSIGTERM to process 1: both saved step {a}; SIGINT to process 1 of the resumed "
          f"run: both saved step {b}; resumed losses vs uninterrupted: "
          + ", ".join(f"step {s}: {got[s]:.6f} / {reference[s]:.6f}"
                      for s in (a + 1, a + 2, b + 1, b + 2, TOTAL))
          + f"; max |diff| over steps {a + 1}-{TOTAL}: {diff:.2e}")
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(a + 1, TOTAL + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step


def test_preempted_exit_code(repo_root, shapes_data_dir, tmp_path):
    """``--preempted_exit_code 42`` (xpk / JobSet restart on 42): a SIGTERM'd single-process run
    saves its step and exits 42 instead of 0; the same command resumes from that step."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-u", "-m", "vlm_jax.main",
           *_args(repo_root, shapes_data_dir, workdir), "--preempted_exit_code", "42"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=repo_root, env=env)
    run = type("Run", (), {"proc": proc, "out": ""})()
    _wait_for_step(workdir, 2, run)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 42, out[-3000:]
    saved = int(re.search(r"Preempted \(SIGTERM\) at step (\d+)", out)[1])
    assert (workdir / "checkpoints" / str(saved)).is_dir()
    assert max(_losses(workdir)) == saved < TOTAL
