"""`vlm-jax compile`: ahead-of-time compilation for TPU topologies with libtpu (no TPU)."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest

from vlm_jax import aot
from vlm_jax import config as config_lib
from vlm_jax.config import ConfigError


def _libtpu_available() -> bool:
    try:
        aot.topology_devices("v5e:2x2")
        return True
    except Exception:  # pylint: disable=broad-except
        return False


needs_libtpu = pytest.mark.skipif(not _libtpu_available(),
                                  reason="libtpu is not installed (pip install -e '.[test]')")


def test_parse_topology():
    assert aot.parse_topology("v5e:16x16") == ("v5e", (16, 16))
    assert aot.parse_topology("v4:8x8x4") == ("v4", (8, 8, 4))
    with pytest.raises(ValueError, match=r"unknown TPU generation 'v9'.*v4.*v5e.*v5p.*v6e"):
        aot.parse_topology("v9:2x2")
    with pytest.raises(ValueError, match="expected <generation>:<chips per dimension>"):
        aot.parse_topology("v5e-256")


@needs_libtpu
def test_topology_device_counts():
    for spec, slices, chips in (("v5e:4x4", 1, 16), ("v4:2x2x2", 1, 8), ("v5e:2x2", 2, 8)):
        devices, chip, n = aot.topology_devices(spec, slices)
        assert n == chips and len(devices) == chips, (spec, len(devices))  # One per chip.
    devices, _, _ = aot.topology_devices("v5e:2x2", 2)
    assert sorted({d.slice_index for d in devices}) == [0, 1]


@needs_libtpu
def test_tiny_config_report_matches_hand_computation(repo_root):
    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}",
                                    ["mesh.data=1", "mesh.fsdp=4"])
    r = aot.plan(config, "v5e:2x2")
    assert r.fits and r.stage == "compiled" and r.devices == 4
    # Reference: every parameter of the model, from its config, sharded over fsdp=4 where the
    # rules shard it: an upper bound of all-replicated and a lower bound of all-sharded.
    from flax import nnx
    from vlm_jax.families import get_family
    build = get_family(config).build_model
    abstract = nnx.eval_shape(lambda: build(config.model, nnx.Rngs(0)))
    leaves = [x for x in nnx.state(abstract).flat_state()]
    sizes = [math.prod(v.get_value().shape) for _, v in leaves]
    n_params = sum(sizes)
    assert r.n_params == n_params
    assert n_params * 4 / 4 <= r.param_bytes < n_params * 4
    # AdamW keeps two float32 moments per parameter (+ scalar counts).
    assert 2 * r.param_bytes <= r.opt_bytes <= 2 * r.param_bytes + 1024
    # The compiled step holds the state and the batch as arguments.
    # uint8 images (normalised on the device) and int32 tokens, a quarter of the batch each.
    batch = config.batch_size // 4 * (64 * 64 * 3 + config.model.text.context_length * 4)
    assert r.argument_bytes >= r.param_bytes + r.opt_bytes + batch
    assert r.temp_bytes > 0 and r.peak_bytes < r.hbm_bytes
    # XLA's FLOP count of the unscanned step is the analytic 3 x forward within a factor 2.
    per_device = r.model_flops_per_step / r.devices
    assert 0.5 < r.compiled_flops_per_device / per_device < 2.0
    text = r.to_text()
    assert "FITS" in text and "step time at 100% MFU" in text


def _cli(repo_root, *args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "vlm_jax.main", "compile", *args],
                          capture_output=True, text=True, cwd=repo_root, timeout=300, env=env)


@needs_libtpu
def test_impossible_setting_exits_nonzero_with_suggestion(repo_root, tmp_path):
    """ViT-g/14 at batch 1M, no remat, on 4 v5e chips: rejected by the pre-check, no compile."""
    out = tmp_path / "report.json"
    proc = _cli(repo_root, "--config", "experiments/clip_openai.py:g/14", "--topology",
                "v5e:2x2", "--config.batch_size=1048576", "--config.model.remat=none",
                "--json", str(out))
    assert proc.returncode == aot.EXIT_DOES_NOT_FIT, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "Suggestions" in proc.stdout
    assert "larger slice" in proc.stdout or "fsdp" in proc.stdout
    import json
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["stage"] == "precheck"


@needs_libtpu
def test_compile_oom_is_reported_with_suggestions(repo_root):
    """Fits the pre-check but not the compiler: activations of 16k images per chip, in one
    micro-batch (--grad_accum_steps 1: no search)."""
    # The towers of clip_tiny's first recipe (clip_tiny.first_recipe), whose activations this
    # batch was sized for: the compiler reports the OOM in seconds.
    first_recipe = ["--config.model.image.pool_type=tok", "--config.model.image.mlp_dim=512",
                    "--config.model.text.mlp_dim=512", "--config.model.text.context_length=24"]
    proc = _cli(repo_root, "--config", "experiments/clip_tiny.py", "--topology", "v5e:2x2",
                "--config.batch_size=65536", "--config.model.dtype=float32",
                "--grad_accum_steps", "1", *first_recipe)
    assert proc.returncode == aot.EXIT_DOES_NOT_FIT, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout
    assert "--config.model.remat=full" in proc.stdout
    # Micro-batches split the same batch (it stays 65536) and, CLIP being contrastive, keep
    # every negative: never a halved batch or plain gradient averaging.
    assert "--config.optim.grad_accum_steps=2 (batch_size stays 65536" in proc.stdout
    assert "every negative kept" in proc.stdout
    assert "--config.batch_size=32768" not in proc.stdout
    assert "gradients" not in proc.stdout.split("Suggestions:")[1]


def test_contrastive_suggestions_never_average_micro_batch_losses(repo_root):
    """A contrastive config accumulating 'gradients' is told to use 'embeddings'; the
    micro-batch suggestion keeps the batch and every negative (no compile: a pre-check)."""
    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}:test",
                                    ["optim.grad_accum_steps=2",
                                     "optim.grad_accum_mode=gradients"])
    r = aot.Report(config_name="t", topology="v5e:2x2", num_slices=1, chip="TPU v5e", chips=4,
                   devices=4, mesh={"fsdp": 4}, batch_size=1024, hbm_bytes=2 ** 30,
                   param_bytes=1, opt_bytes=2, n_params=1, stage="compile-oom",
                   grad_accum_steps=2, grad_accum_mode="gradients", batch_shards=4)
    text = "\n".join(aot._suggestions(r, config))  # pylint: disable=protected-access
    assert "--config.optim.grad_accum_mode=embeddings" in text
    assert "--config.optim.grad_accum_steps=4 (batch_size stays 1024" in text
    assert "every negative kept" in text
    assert "grad_accum_mode=gradients" not in text


@pytest.mark.slow  # Five TPU compiles: minutes of CPU (7 min on a loaded 2-core machine).
@needs_libtpu
def test_micro_batch_search_picks_the_smallest_count_that_fits(repo_root, monkeypatch):
    """`--grad_accum_steps auto` against each count compiled directly: with an HBM budget
    between the compiled peaks of 2 and 4 micro-batches (the same TPU program, a smaller
    chip's budget), the search must end at 4, with 4's peak; its FLOPs count every loop (two
    scanned layers, four micro-batches) by its trip count."""
    config = config_lib.load_config(
        f"{repo_root / 'experiments/clip_tiny.py'}:test",
        ["batch_size=16384", "mesh.data=1", "mesh.fsdp=4", "loss.variant=chunked",
         "loss.chunk_size=1024", "model.scan_layers=true", "model.image.depth=2",
         "model.text.depth=2"])
    direct = {k: aot.plan(config, "v5e:2x2", grad_accum_steps=k) for k in (1, 2, 4)}
    peaks = {k: r.peak_bytes for k, r in direct.items()}
    assert peaks[4] < min(peaks[1], peaks[2]), peaks  # Activations shrink with the micro-batch.
    budget = (max(peaks[4], 1) + min(peaks[1], peaks[2])) // 2
    monkeypatch.setitem(aot.CHIPS, "v5e", dataclasses.replace(aot.CHIPS["v5e"],
                                                              hbm_bytes=budget))
    r = aot.plan(config, "v5e:2x2", grad_accum_steps="auto")
    smallest = min(k for k, p in peaks.items() if p <= budget)
    assert r.fits and r.grad_accum_steps == smallest == 4, (r.search, peaks, budget)
    assert r.peak_bytes == peaks[4] and r.grad_accum_mode == "embeddings"
    assert [e["k"] for e in r.search] == [1, 2, 4] and r.search[-1]["result"] == "fits"
    assert "FITS: peak" in r.to_text() and "4 micro-batches of 4096" in r.to_text()
    # The FLOPs count loops by their trip counts: 2 and 4 micro-batches do the same matrix
    # products (the towers' forward pass twice, their backward once, the loss once), whatever
    # XLA unrolls; counting each loop body once would halve the 4-step loop's share. Both
    # exceed the unsplit step by gradient caching's extra forward pass.
    flops = {k: x.compiled_matmul_flops_per_device for k, x in direct.items()}
    assert r.compiled_matmul_flops_per_device == flops[4] and r.loops_counted_once == 0
    assert abs(flops[4] / flops[2] - 1) < 0.02, flops
    assert flops[2] > 1.05 * flops[1], flops


def test_bad_topology_is_a_config_error(repo_root):
    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}:test")
    with pytest.raises(ConfigError, match="unknown TPU generation"):
        aot.plan(config, "v9:2x2")
    proc = _cli(repo_root, "--config", "experiments/clip_tiny.py:test", "--topology", "tpu256")
    assert proc.returncode == 2 and "--topology 'tpu256'" in proc.stderr


@needs_libtpu
def test_multi_slice_mesh_spans_slices(repo_root):
    """Two v5e:2x2 slices: the mesh's `slice` axis crosses them (hybrid ICI/DCN mesh)."""
    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}:test",
                                    ["mesh.slice=2", "mesh.data=1", "mesh.fsdp=-1"])
    r = aot.plan(config, "v5e:2x2", num_slices=2)
    assert r.fits and r.devices == 8 and r.chips == 8
    assert r.mesh == {"slice": 2, "data": 1, "fsdp": 4, "tensor": 1}
    devices, _, _ = aot.topology_devices("v5e:2x2", 2)
    from vlm_jax import parallel
    mesh = parallel.create_mesh(config.mesh, devices)
    for i in range(2):  # Each index of the slice axis holds the devices of one slice.
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
