"""Two JAX processes on localhost (gloo) train exactly as one process with the same global batch.

Uses the shipped launcher ``python -m vlm_jax.launch_local``: 2 processes x 4 CPU devices form
one 8-device mesh; each process loads only its half of every global batch.
"""
import shutil
import subprocess
import sys

import pytest

from tests.runs import train_losses_per_run

pytestmark = pytest.mark.e2e


_losses = train_losses_per_run


def _train_args(repo_root, shapes_data_dir, workdir):
    return ["train", "--config", str(repo_root / "experiments/clip_tiny.py") + ":test",
            "--workdir", str(workdir), f"--config.data.data_dir={shapes_data_dir}",
            "--config.log_every_steps=1", "--config.checkpoint.every_steps=3",
            "--config.checkpoint.async_save=false"]


def _launch(repo_root, args, num_processes):
    cmd = [sys.executable, "-m", "vlm_jax.launch_local", "--num_processes", str(num_processes),
           "--devices_per_process", str(8 // num_processes), "--timeout", "500", "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, timeout=600)


def test_two_processes_match_one_and_resume(repo_root, shapes_data_dir, tmp_path):
    one = _launch(repo_root, _train_args(repo_root, shapes_data_dir, tmp_path / "one"), 1)
    assert one.returncode == 0, one.stdout[-3000:]
    two = _launch(repo_root, _train_args(repo_root, shapes_data_dir, tmp_path / "two"), 2)
    assert two.returncode == 0, two.stdout[-3000:]
    assert "2 process(es)" in two.stdout and "on 8 cpu devices" in two.stdout
    assert "[p1]" in two.stdout  # Both processes really ran.

    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert got[step][0] == pytest.approx(ref[step][0], abs=1e-5), (step, got, ref)
    assert len({round(v[0], 4) for v in ref.values()}) == 6  # The model really trains.

    # Both processes wrote the checkpoint (orbax: one per step, iterator state per process).
    ckpt = tmp_path / "two" / "checkpoints"
    assert (ckpt / "3").is_dir() and (ckpt / "6").is_dir()
    data_files = {p.name for p in (ckpt / "3" / "data").iterdir()}
    assert any("0" in n for n in data_files) and any("1" in n for n in data_files), data_files

    # Restore across both processes: drop the final checkpoint, resume from step 3 on 2 processes
    # and get the same steps 4-6 (same state, same data position on each process).
    shutil.rmtree(ckpt / "6")
    again = _launch(repo_root, _train_args(repo_root, shapes_data_dir, tmp_path / "two"), 2)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Resuming from checkpoint step 3" in again.stdout
    resumed = _losses(tmp_path / "two")
    for step in (4, 5, 6):
        assert len(resumed[step]) == 2  # Logged by the first run and by the resumed one.
        assert resumed[step][1] == pytest.approx(ref[step][0], abs=1e-5), step


def test_a_failing_process_stops_the_launch(repo_root, tmp_path):
    """A bad config fails in every process; the launcher returns the error code, no hang."""
    args = ["train", "--config", str(repo_root / "experiments/clip_tiny.py") + ":test",
            "--workdir", str(tmp_path / "bad"), "--config.batch_sise=8"]
    proc = _launch(repo_root, args, 2)
    assert proc.returncode == 2
    assert "batch_sise" in proc.stdout and "batch_size" in proc.stdout
