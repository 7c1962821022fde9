"""The Flamingo recipe end to end with the smoke configs: ``vlm-jax train`` a CLIP and a language
model, then a Flamingo initialised from both (frozen), then ``vlm-jax eval`` on its checkpoint."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config as config_lib
from vlm_jax import train

pytestmark = pytest.mark.e2e


def _cli(repo_root, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", "vlm_jax.main", *args], capture_output=True,
                          text=True, cwd=repo_root, env=env, timeout=900)


def _train(repo_root, experiment, workdir, data_dir, *overrides):
    proc = _cli(repo_root, "train", "--config", f"{repo_root / 'experiments' / experiment}:test",
                "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _params(workdir):
    config = config_lib.load_json_config(str(workdir / "config.json"))
    _, params, _ = train.restore_for_inference(config, workdir)
    return [np.asarray(x) for x in jax.tree.leaves(params)], params


@pytest.mark.slow  # three runs; test_flamingo covers the model, init_from and the evaluators.
def test_flamingo_from_clip_and_lm_runs(repo_root, tmp_path, shapes_data_dir):
    clip, lm, fl = tmp_path / "clip", tmp_path / "lm", tmp_path / "flamingo"
    _train(repo_root, "clip_tiny.py", clip, shapes_data_dir)
    proc = _train(repo_root, "lm_tiny_shapes.py", lm, shapes_data_dir)
    assert "| lm_loss/perplexity |" in proc.stdout

    # A Flamingo whose LM does not match the LM run: refused before training, naming the run.
    init = (f"--config.init_from={{'vision': {{'workdir': '{clip}', 'subtree': 'image'}}, "
            f"'lm': {{'workdir': '{lm}', 'subtree': ''}}}}")
    proc = _cli(repo_root, "train", "--config",
                f"{repo_root / 'experiments/flamingo_tiny_shapes.py'}:test", "--workdir",
                str(tmp_path / "bad"), f"--config.data.data_dir={shapes_data_dir}", init,
                "--config.model.lm.mlp_dim=96")
    assert proc.returncode != 0 and str(lm) in proc.stderr and "mlp" in proc.stderr

    proc = _train(repo_root, "flamingo_tiny_shapes.py", fl, shapes_data_dir, init)
    assert "Initialised 'vision'" in proc.stdout and "Initialised 'lm'" in proc.stdout
    assert "| fewshot_vqa/vqa_accuracy_2shot |" in proc.stdout
    # The frozen towers are the source runs' parameters, bit for bit, after training.
    got, clip_p, lm_p = _params(fl)[1], _params(clip)[1], _params(lm)[0]
    for a, b in ((got["vision"], jax.tree.leaves(clip_p["image"])), (got["lm"], lm_p)):
        for x, y in zip(jax.tree.leaves(a), b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    proc = _cli(repo_root, "eval", "--workdir", str(fl), "--evaluators", "fewshot_vqa")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((fl / "eval_results_test.json").read_text())
    vqa = next(r for r in records if r["task"] == "fewshot_vqa")
    assert {"vqa_accuracy_0shot", "vqa_accuracy_2shot", "vqa_majority_baseline"} <= set(
        vqa["metrics"])


def test_init_from_a_run_without_checkpoint_names_it(repo_root, tmp_path, shapes_data_dir):
    config = config_lib.load_config(
        f"{repo_root / 'experiments/flamingo_tiny_shapes.py'}:test",
        [f"data.data_dir={shapes_data_dir}",
         f"init_from={{'lm': {{'workdir': '{tmp_path / 'nowhere'}', 'subtree': ''}}}}"])
    s = train.setup(config)
    with pytest.raises(ckpt_lib.CheckpointError, match="nowhere.*config.json"):
        train.load_pretrained(config, s, s.abstract_state["params"])
