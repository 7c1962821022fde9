"""A run with ``--workdir gs://bucket/run`` against a real GCS API (fake-gcs-server on 127.0.0.1,
tests/gcs_emulator.py): preempted by SIGTERM, resumed with the losses of an uninterrupted run,
evaluated from the bucket without --config and from a --checkpoint; nothing of the run on local
disk."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.runs import train_losses

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL, EVERY = 12, 4
RUN_FILES = ("metrics.jsonl", "config.json", "metrics.png")


def _args(workdir: str, data_dir: str) -> list[str]:
    return ["train", "--config", str(REPO / "experiments" / "clip_tiny.py") + ":test",
            "--workdir", workdir, f"--config.data.data_dir={data_dir}",
            f"--config.total_steps={TOTAL}", f"--config.checkpoint.every_steps={EVERY}",
            "--config.log_every_steps=1", "--config.checkpoint.async_save=False",
            "--config.checkpoint.keep=100"]  # The preemption step stays, for eval --checkpoint.


_losses = train_losses


def _local_run_files(*roots: pathlib.Path) -> list[str]:
    """Files of a run under ``roots``: its outputs by name, or anything under a ``gs:`` or
    ``checkpoints`` directory (pathlib's mangling of gs://bucket/run is gs:/bucket/run)."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            parts = pathlib.Path(dirpath).relative_to(root).parts
            for name in filenames + dirnames:
                if (name in RUN_FILES or name.startswith("eval_results") or "tfevents" in name
                        or name in ("gs:", "checkpoints") or "gs:" in parts):
                    found.append(os.path.join(dirpath, name))
    return found


def test_train_preempt_resume_eval_on_gcs(gcs_emulator, shapes_data_dir, tmp_path):
    """vlm-jax train on gs:// -> SIGTERM -> exit 0 with a checkpoint -> the same command resumes
    and its losses equal a local uninterrupted run's -> eval without --config and eval
    --checkpoint write eval_results to the bucket; no run file on local disk."""
    import gcsfs  # pylint: disable=import-outside-toplevel

    bucket = gcs_emulator.create_bucket(f"vlm-run-{uuid.uuid4().hex[:10]}")
    workdir = f"{bucket}/run"
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    env = dict(os.environ, **gcs_emulator.env, HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "")
                                                       .split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "vlm_jax.main"]

    def run(args, where=cwd):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + args, capture_output=True, text=True, cwd=where, env=env,
                              timeout=600)
        print(f"[gcs e2e] vlm-jax {' '.join(args[:3])}...: {time.perf_counter() - t0:.1f} s")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    # The reference: the same config, uninterrupted, in a local workdir.
    ref_dir = tmp_path / "reference"
    run(_args(str(ref_dir / "run"), shapes_data_dir), where=ref_dir.parent)
    reference = _losses(ref_dir / "run")
    assert sorted(reference) == list(range(1, TOTAL + 1))

    # Preempted: SIGTERM once a few steps are logged in the bucket.
    proc = subprocess.Popen(cmd + _args(workdir, shapes_data_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        logged = _losses(workdir)
        if logged and max(logged) >= 3:
            break
        time.sleep(0.05)
    signalled_after = max(_losses(workdir) or {0: 0})
    proc.send_signal(signal.SIGTERM)
    out1, _ = proc.communicate(timeout=300)
    print(f"[gcs e2e] SIGTERM after step {signalled_after}: exit {proc.returncode}; "
          + next((line for line in out1.splitlines() if "Preempted" in line), "no 'Preempted'"))
    assert proc.returncode == 0, out1[-3000:]
    saved = int(re.search(r"Preempted \(SIGTERM\) at step (\d+)", out1).group(1))
    assert signalled_after <= saved < TOTAL

    # The same command again: resumes from the saved step and finishes.
    out2 = run(_args(workdir, shapes_data_dir))
    print("[gcs e2e] " + next(line for line in out2.splitlines() if "Resuming" in line))
    assert f"Resuming from checkpoint step {saved} in {workdir}/checkpoints" in out2
    losses = _losses(workdir)
    print("[gcs e2e] losses after resume (gs://) vs uninterrupted (local): "
          + ", ".join(f"{s}: {losses[s]:.6f}/{reference[s]:.6f}"
                      for s in range(saved + 1, min(saved + 4, TOTAL + 1))))
    assert losses == reference  # Every step, bitwise (one process).

    fs = gcsfs.GCSFileSystem()
    fs.rm(f"{workdir}/eval_results_test.json")  # Written by train: eval must write it again.
    fs.invalidate_cache()

    # eval from the bucket, without --config (the run's config.json in the bucket).
    out3 = run(["eval", "--workdir", workdir])
    results = json.loads(fs.cat(f"{workdir}/eval_results_test.json"))
    print(f"[gcs e2e] eval --workdir {workdir}: " + ", ".join(
        f"{r['task']}@{r['step']}" for r in results))
    assert {r["step"] for r in results} == {TOTAL} and "zeroshot/acc1" in out3
    fs.invalidate_cache()

    # eval --checkpoint of the preemption step.
    run(["eval", "--checkpoint", f"{workdir}/checkpoints/{saved}"])
    fs.invalidate_cache()
    results = json.loads(fs.cat(f"{workdir}/eval_results_test.json"))
    print(f"[gcs e2e] eval --checkpoint {workdir}/checkpoints/{saved}: " + ", ".join(
        f"{r['task']}@{r['step']}" for r in results))
    assert {r["step"] for r in results} == {saved}

    # Everything in the bucket, nothing on local disk.
    objects = sorted(o[len(workdir) - len("gs://") + 1:] for o in fs.find(workdir))
    events = [o for o in objects if o.startswith("tensorboard/") and "tfevents" in o]
    steps = sorted({int(o.split("/")[1]) for o in objects if o.startswith("checkpoints/")})
    print(f"[gcs e2e] {len(objects)} objects in {workdir}: "
          f"{[o for o in objects if '/' not in o]}, {len(events)} event files, "
          f"checkpoints {steps}")
    for name in RUN_FILES + ("eval_results_test.json",):
        assert name in objects
    assert len(events) == 2  # One per process start.
    assert saved in steps and TOTAL in steps
    assert f"checkpoints/{TOTAL}/commit_success.txt" in objects
    local = _local_run_files(cwd, home) + [str(p) for p in (REPO / "gs:", cwd / "gs:")
                                           if p.exists()]
    print(f"[gcs e2e] run files on local disk (cwd, HOME): {local}")
    assert not local
