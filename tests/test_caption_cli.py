"""``vlm-jax train`` of the CoCa smoke config, then ``vlm-jax caption`` on a folder of images."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


def _cli(repo_root, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", "vlm_jax.main", *args], capture_output=True,
                          text=True, cwd=repo_root, env=env, timeout=600)


def test_train_coca_then_caption_a_folder(repo_root, tmp_path, shapes_data_dir):
    workdir = tmp_path / "coca"
    proc = _cli(repo_root, "train", "--config",
                str(repo_root / "experiments/coca_tiny_shapes.py") + ":test", "--workdir",
                str(workdir), f"--config.data.data_dir={shapes_data_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| captioning/cider |" in proc.stdout  # The final evaluation captions the test split.
    records = json.loads((workdir / "eval_results_test.json").read_text())
    assert "captioning" in {r["task"] for r in records}

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(32, 32), (50, 40), (20, 70)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            images / f"im{i}.png")
    (images / "corrupt.jpg").write_bytes(b"not a jpeg")
    for method in ("greedy", "beam"):
        out = tmp_path / f"{method}.jsonl"
        proc = _cli(repo_root, "caption", "--workdir", str(workdir), "--images", str(images),
                    "--method", method, "--output", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Skipped corrupt.jpg" in proc.stdout
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [x["image"] for x in lines] == ["im0.png", "im1.png", "im2.png"]
        assert all(isinstance(x["caption"], str) for x in lines)
    proc = _cli(repo_root, "caption", "--workdir", str(workdir), "--images",
                str(tmp_path / "missing"))
    assert proc.returncode == 2 and "not a directory" in proc.stderr
