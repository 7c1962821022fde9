"""LiT / SigLiT (vlm_jax/families/lit.py): a locked tower loaded from a converted open_clip model
stays bit for bit, has no optimizer state, and training on its cached embeddings
(`vlm-jax data embed`) gives the live tower's losses."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import convert, embed, train
from vlm_jax.config import ConfigError
from vlm_jax.families import get_family

STEPS = 4


def _losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def open_clip_run(repo_root, tmp_path_factory):
    """open_clip's tiny_gelu fixture converted into a workdir (`vlm-jax convert`)."""
    workdir = tmp_path_factory.mktemp("lit") / "open_clip"
    convert.convert(str(repo_root / "tests" / "fixtures" / "open_clip" / "tiny_gelu.safetensors"),
                    str(workdir), act="gelu")
    return workdir


def _lit_config(repo_root, shapes_data_dir, open_clip_run, arg="test", overrides=()):
    """lit_tiny_shapes.py:test with the converted model's image tower, loaded and locked."""
    source = json.loads((open_clip_run / "config.json").read_text())["model"]
    # The converted tower's own layout (its layers stacked for a scan); the rest is the run's.
    image = {**source["image"], "scan_layers": source["scan_layers"]}
    init = {p: {"workdir": str(open_clip_run), "subtree": p}
            for p in ("image", "image_projection")}
    return config_lib.load_config(
        f"{repo_root / 'experiments' / 'lit_tiny_shapes.py'}:{arg}",
        [f"data.data_dir={shapes_data_dir}", f"total_steps={STEPS}", "log_every_steps=1",
         "checkpoint.every_steps=100", f"model.embed_dim={source['embed_dim']}",
         f"model.image={image!r}", f"init_from={init!r}",
         "evals={'zeroshot': {'type': 'zeroshot', 'dataset': 'shapes', 'split': 'test', "
         "'every_steps': -1, 'max_examples': 64, 'options': {}}}", *overrides])


def test_locked_tower_and_cached_embeddings(repo_root, shapes_data_dir, open_clip_run, tmp_path):
    config = _lit_config(repo_root, shapes_data_dir, open_clip_run)
    family = get_family(config)
    assert family.name == "lit" and family.locked_parts(config) == ("image", "image_projection")

    t0 = time.perf_counter()
    train.train_and_evaluate(config, str(tmp_path / "live"))
    live_s = time.perf_counter() - t0

    # The locked parts are the converted open_clip weights, bit for bit, and have no
    # optimizer state (AdamW's decoupled weight decay would move them otherwise).
    s, trained, step = train.restore_for_inference(config, str(tmp_path / "live"))
    ref_s, converted, _ = train.restore_for_inference(
        config_lib.load_json_config(str(open_clip_run / "config.json")), str(open_clip_run))
    assert step == STEPS
    for part in ("image", "image_projection"):
        same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                            jax.device_get(trained[part]), jax.device_get(converted[part]))
        assert all(jax.tree.leaves(same)), part
    init = jax.device_get(s.init_fn()["params"])
    assert not np.array_equal(init["text"]["token_embed"]["embedding"],
                              np.asarray(trained["text"]["token_embed"]["embedding"]))
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(s.abstract_state["opt_state"])[0]]
    assert any("'text'" in p for p in opt_paths)
    assert not any("'image'" in p or "'image_projection'" in p for p in opt_paths)

    # The cache: one record per training pair, then a text-only step on the same stream.
    meta = embed.embed_images(config, str(tmp_path / "emb"))
    assert meta["num_records"] == 512 and meta["dim"] == 24
    assert meta["init_from"]["image"] == {"workdir": str(open_clip_run), "subtree": "image",
                                          "step": 0}
    cached = _lit_config(repo_root, shapes_data_dir, open_clip_run, overrides=[
        "data.name=image_embeddings", f"data.train_files={tmp_path / 'emb'}"])
    assert set(family.batch_spec(cached)) == {"image_emb", "text"}
    t0 = time.perf_counter()
    train.train_and_evaluate(cached, str(tmp_path / "cached"))
    cached_s = time.perf_counter() - t0
    live, from_cache = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    print(f"live {live} ({live_s:.1f} s), cached {from_cache} ({cached_s:.1f} s)")
    assert len(live) == len(from_cache) == STEPS
    np.testing.assert_allclose(from_cache, live, atol=1e-5, rtol=0)
    assert live[0] != live[-1]  # it trains

    # A cache of another tower (here: a random one) is refused, naming the difference.
    other = _lit_config(repo_root, shapes_data_dir, open_clip_run, overrides=[
        "data.name=image_embeddings", f"data.train_files={tmp_path / 'emb'}", "init_from={}"])
    with pytest.raises(ConfigError, match="init_from.image"):
        family.make_data(other)


@pytest.mark.e2e
def test_embed_command_needs_a_locked_image_tower(repo_root, tmp_path):
    """`vlm-jax data embed` on a config without a locked image tower stops before reading data,
    naming what it needs, and writes nothing."""
    out = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "data", "embed", "--config",
         f"{repo_root / 'experiments' / 'clip_tiny.py'}:test", "--output",
         str(tmp_path / "emb")], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stderr
    assert "config.model.name='lit'" in out.stderr
    assert not (tmp_path / "emb").exists()


@pytest.mark.e2e
@pytest.mark.slow  # two launches of 1 and 2 processes: 1-2 minutes on 2 cores
def test_embed_on_two_processes_writes_what_one_process_writes(repo_root, shapes_data_dir,
                                                              open_clip_run, tmp_path):
    """`vlm-jax data embed` under the local launcher (gloo, 2 processes x 4 CPU devices) writes
    the records one process with 8 devices writes: same keys and captions in the same order,
    embeddings within 1e-6, and one copy of each shard (process 0 writes)."""
    import msgpack  # pylint: disable=import-outside-toplevel
    from array_record.python import array_record_data_source  # pylint: disable=C0415

    config = _lit_config(repo_root, shapes_data_dir, open_clip_run)
    overrides = [f"--config.data.data_dir={shapes_data_dir}",
                 f"--config.model.embed_dim={config.model.embed_dim}",
                 f"--config.model.image={config.model.image.to_dict()!r}",
                 f"--config.init_from={config.init_from.to_dict()!r}"]

    def run(num_processes, out):
        cmd = [sys.executable, "-m", "vlm_jax.launch_local", "--num_processes",
               str(num_processes), "--devices_per_process", str(8 // num_processes),
               "--timeout", "400", "--", "data", "embed", "--config",
               f"{repo_root / 'experiments' / 'lit_tiny_shapes.py'}:test", "--output", str(out),
               *overrides]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, timeout=500,
                              check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    run(1, tmp_path / "one")
    assert "[p1]" in run(2, tmp_path / "two").stdout  # Both processes ran.

    def records(out):
        meta = json.loads((out / "embeddings.json").read_text())
        assert sorted(p.name for p in out.iterdir()) == sorted(["embeddings.json",
                                                                *meta["shards"]])
        source = array_record_data_source.ArrayRecordDataSource(
            [str(out / name) for name in meta["shards"]])
        return meta, [msgpack.unpackb(source[i], raw=False) for i in range(len(source))]

    meta1, ref = records(tmp_path / "one")
    meta2, got = records(tmp_path / "two")
    assert meta1["num_records"] == meta2["num_records"] == len(ref) == len(got) == 512
    assert [r["key"] for r in got] == [r["key"] for r in ref]
    assert [r["caption"] for r in got] == [r["caption"] for r in ref]
    emb = lambda rows: np.stack([np.frombuffer(r["image_emb"], "<f4") for r in rows])  # noqa
    np.testing.assert_allclose(emb(got), emb(ref), atol=1e-6, rtol=0)
    assert np.abs(emb(ref)).max() > 0 and len({r["key"] for r in ref}) == 512
