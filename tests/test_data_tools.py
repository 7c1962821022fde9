"""`vlm-jax data export | convert | inspect` and training from the shards they write."""
import json
import os
import subprocess
import sys

import pytest

from input_pipeline import sources, tools
from tests.test_sources import good, write_shard

pytestmark = pytest.mark.e2e


def _run(repo_root, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", "vlm_jax.main", *args], capture_output=True,
                          text=True, cwd=repo_root, timeout=600, env=env)


@pytest.fixture(scope="module")
def shards(shapes_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds")
    paths = tools.export_webdataset(shapes_data_dir, "shapes", "32px", "train", str(out),
                                    shard_size=200)
    return out, paths


def test_export_writes_every_record(shards, shapes_data_dir):
    out, paths = shards
    assert len(paths) == 3  # 512 records in shards of 200.
    src = sources.WebDatasetSource(str(out / "train-*.tar"))
    assert len(src) == 512 and not src.skipped_shards
    r = src[5]
    assert r["caption"] and json.loads(r["metadata"])["index"] == 5


def test_train_from_tar_shards_then_convert_and_inspect(repo_root, shards, shapes_data_dir,
                                                        tmp_path):
    out, _ = shards
    common = [f"--config.data.data_dir={shapes_data_dir}", "--config.data.name=webdataset",
              f"--config.data.train_files={out}/train-{{00000..00002}}.tar"]
    proc = _run(repo_root, "train", "--config", "experiments/clip_tiny.py:test", "--workdir",
                str(tmp_path / "run"), *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("data/skipped") == 0 for r in rows)
    assert (tmp_path / "run" / "eval_results_test.json").exists()

    proc = _run(repo_root, "data", "convert", "--input", f"{out}/train-*.tar", "--output",
                str(tmp_path / "ar" / "train"), "--num_shards", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _run(repo_root, "data", "inspect", "--format", "array_record", "--input",
                str(tmp_path / "ar" / "train-*.array_record"), "--output",
                str(tmp_path / "grid.png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["samples"] == 512 and report["skipped"] == 0
    assert 3 <= report["caption_words"]["mean"] <= 20
    assert (tmp_path / "grid.png").stat().st_size > 10_000


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(repo_root, shapes_data_dir,
                                                              tmp_path):
    samples = []
    for i in range(300):
        key, members = good(i)
        if i % 2:
            members = {"png": members["png"], "txt": b"   "}  # empty caption
        samples.append((key, members))
    write_shard(tmp_path / "bad.tar", samples)
    proc = _run(repo_root, "train", "--config", "experiments/clip_tiny.py:test", "--workdir",
                str(tmp_path / "run"), f"--config.data.data_dir={shapes_data_dir}",
                "--config.data.name=webdataset", f"--config.data.train_files={tmp_path}/bad.tar",
                "--config.total_steps=20", "--config.log_every_steps=10")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "max_skipped_fraction" in proc.stderr and "empty_caption" in proc.stderr


def test_missing_train_files_is_a_clear_error(repo_root, tmp_path):
    proc = _run(repo_root, "train", "--config", "experiments/clip_tiny.py:test", "--workdir",
                str(tmp_path / "run"), "--config.data.name=webdataset",
                f"--config.data.train_files={tmp_path}/none-{{000..003}}.tar")
    assert proc.returncode == 2
    assert "none-000.tar" in proc.stderr and "train_files" in proc.stderr
