"""config.profile: a trace of exactly the requested training steps appears in <workdir>/profile."""
import gzip
import json

import pytest

from vlm_jax import config as config_lib
from vlm_jax import train


def test_profile_traces_the_requested_steps(repo_root, tmp_path, shapes_data_dir):
    config = config_lib.load_config(
        f"{repo_root / 'experiments/clip_tiny.py'}:test",
        [f"data.data_dir={shapes_data_dir}", "total_steps=5", "evals.zeroshot.max_examples=32",
         "evals.retrieval.max_examples=32", "profile.start_step=3", "profile.num_steps=2"])
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))

    runs = sorted((workdir / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1, runs  # One trace, stopped after step 4 (not at the end of the run).
    assert list(runs[0].glob("*.xplane.pb")), list(runs[0].iterdir())
    # The trace holds the device executions of the jitted train step: one XLA run id per step,
    # so exactly steps 3 and 4 (of 5; step 1 also compiles) were traced.
    (trace,) = runs[0].glob("*.trace.json.gz")
    events = json.load(gzip.open(trace))["traceEvents"]
    run_ids = {e["args"]["run_id"] for e in events
               if (e.get("args") or {}).get("hlo_module") == "jit_train_step"}
    assert len(run_ids) == 2, run_ids


def test_profile_start_step_must_be_positive(repo_root, tmp_path):
    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}:test",
                                    ["profile.start_step=0", "profile.num_steps=2"])
    with pytest.raises(config_lib.ConfigError, match=r"config\.profile\.start_step=0"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # Refused before any compute.
