"""Config loading: overrides keep types, unknown keys fail naming the key, CLI fails early."""
import json
import pathlib
import subprocess
import sys
import time

import pytest

from vlm_jax import config as config_lib
from vlm_jax import configs

TINY = "experiments/clip_tiny.py"


def test_override_types(repo_root):
    c = config_lib.load_config(str(repo_root / TINY), ["total_steps=7", "optim.lr=2e-4",
                                                       "model.dtype=bfloat16", "mesh.fsdp=2",
                                                       "checkpoint.async_save=false"])
    assert c.total_steps == 7 and isinstance(c.total_steps, int)
    assert c.optim.lr == pytest.approx(2e-4)
    assert c.model.dtype == "bfloat16"
    assert c.mesh.fsdp == 2
    assert c.checkpoint.async_save is False


@pytest.mark.parametrize("override, expected", [
    ("no_such_key=1", "'no_such_key'"),
    ("model.imgae.width=3", "Did you mean 'model.image'"),
    ("total_steps=abc", "expects int"),
    ("optim=3", "group of settings"),
    ("total_steps", "has no '='"),
])
def test_bad_overrides_name_the_key(repo_root, override, expected):
    with pytest.raises(config_lib.ConfigError, match=expected):
        config_lib.load_config(str(repo_root / TINY), [override])


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load_config("experiments/does_not_exist.py")


def test_config_is_locked(repo_root):
    c = config_lib.load_config(str(repo_root / TINY))
    with pytest.raises(AttributeError):
        c.new_field = 1


def test_cli_unknown_key_fails_before_compute(repo_root, tmp_path):
    """`vlm-jax train --config.no_such_key=1` exits 2 naming the key, writes nothing."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "train", "--config", str(repo_root / TINY),
         "--workdir", str(tmp_path / "run"), "--config.no_such_key=1"],
        capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no_such_key" in proc.stderr
    assert not (tmp_path / "run").exists()  # Nothing was created: no compute happened.
    assert time.perf_counter() - start < 60


def test_config_diff():
    saved = {"model": {"width": 8, "depth": 2}, "seed": 0}
    now = {"model": {"width": 16, "depth": 2}, "seed": 0}
    assert config_lib.diff(saved, now) == [("model.width", 8, 16)]


# ---- The base config (vlm_jax/configs.py) ------------------------------------------------------

EXPERIMENTS = json.loads((pathlib.Path(__file__).parent / "fixtures" / "experiment_configs"
                          / "before_base_config.json").read_text())

# Keys each experiment gained from the base config (at their defaults); the values of every key
# it had are unchanged. Every experiment gains the keys of document sources other than shapes.
# Image-text experiments (CLIP, SigLIP, CoCa) gain the document keys and
# optim.trainable (CLIP / SigLIP also CoCa's loss weights); LM / Flamingo gain the image-text
# data keys and a loss section, which they do not read.
_DOCS = {"data.max_images", "data.seq_length", "data.docs_per_row"}
_PAIRS = {"data.train_files", "data.tokenizer", "data.eval_name", "data.max_skipped_fraction",
          "data.min_side", "data.mixture", "data.image_key", "data.caption_key"}
_LOSS = {"loss.name", "loss.variant", "loss.chunk_size", "loss.contrastive_weight",
         "loss.caption_weight"}
_WEIGHTS = {"loss.contrastive_weight", "loss.caption_weight"}
# Document sources other than shapes (text corpora, web documents), the micro-batching mode and
# the sample filters of raw image-text shards: new keys for every experiment.
_SOURCES = {"data.eval_files", "data.text_key", "data.record_format", "data.min_image_similarity",
            "optim.grad_accum_mode"} | {
    f"data.filters.{k}" for k in ("max_aspect_ratio", "min_caption_chars", "max_caption_chars",
                                  "min_caption_words", "max_caption_words", "metadata")}
# The streamed webdataset modes (input_pipeline.sources.WebDatasetStream): new for every one.
_SOURCES |= {"data.webdataset_mode", "data.shuffle_buffer", "data.samples_per_epoch"}
# SigLIP 2's self-supervised switches (vlm_jax/distill.py; off at weight 0): new for every one.
_SOURCES |= {f"loss.{k}" for k in (
    "self_distill_weight", "masked_pred_weight", "ssl_start_fraction", "ema_momentum",
    "local_views", "local_size", "global_crop_scale", "local_crop_scale", "mask_ratio",
    "student_temp", "teacher_temp")}
# LocCa's decoder term (vlm_jax/families/locca.py; read by model.name='locca' only).
_SOURCES |= {"loss.locca_weight", "loss.locca_task_weights", "loss.locca_parallel_fraction"}
NEW_DEFAULTS = {
    "clip_tiny": _SOURCES | _DOCS | _WEIGHTS | {"optim.trainable", "init_from", "published"},
    "siglip_tiny": _SOURCES | _DOCS | _WEIGHTS | {"optim.trainable", "init_from", "published"},
    "clip_openai": _SOURCES | _DOCS | _WEIGHTS | {"optim.trainable", "init_from"},
    "clip_laion400m": _SOURCES | _DOCS | _WEIGHTS | {"optim.trainable", "init_from"},
    "coca_tiny_shapes": _SOURCES | _DOCS | {"optim.trainable", "init_from", "published"},
    "coca_laion2b": _SOURCES | _DOCS | {"optim.trainable", "init_from"},
    "lm_tiny_shapes": _SOURCES | _PAIRS | _LOSS | {"init_from", "published"},
    "flamingo_tiny_shapes": _SOURCES | _PAIRS | _LOSS | {"published"},
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Experiments written after the base config existed (nothing to compare with): each variant
# loads, i.e. every key it sets is known to the base with the base's type.
AFTER_BASE = ("lit_tiny_shapes.py", "lit_tiny_shapes.py:sigmoid", "lit_tiny_shapes.py:test",
              "lit_b16b.py", "lit_g14_sigmoid.py", "locca_tiny_shapes.py",
              "locca_tiny_shapes.py:test", "locca_tiny_shapes.py:siglip2",
              "locca_tiny_shapes.py:siglip2_test")


# Experiments written after the fixture, as another experiment plus the keys they set: the
# experiment they extend, its variants, and the keys allowed to differ from (or add to) it.
DERIVED = {
    "siglip2_tiny_shapes": ("siglip_tiny", (None, "test"), {
        "name", "model.ssl_prototypes", "model.ssl_hidden_dim", "model.ssl_bottleneck_dim",
        "loss.self_distill_weight", "loss.masked_pred_weight", "loss.local_views"}),
}


# Experiments written after the fixture from the base config alone (published recipes): the
# keys they must set to the values their docstrings cite.
STANDALONE = {
    "siglip2_b16": {"batch_size": 32768, "total_steps": 40_000_000_000 // 32768,
                    "optim.lr": 1e-3, "optim.warmup_steps": 20_000, "optim.grad_clip_norm": 1.0,
                    "model.image.image_size": 256, "model.image.patch_size": 16,
                    "model.text.context_length": 64, "model.text.vocab_size": 256_000,
                    "loss.name": "sigmoid", "loss.ssl_start_fraction": 0.8,
                    "loss.self_distill_weight": 0.25, "loss.masked_pred_weight": 0.0625,
                    "loss.local_views": 8, "loss.mask_ratio": 0.5},
    "siglip2_so400m16": {"batch_size": 32768, "model.image.width": 1152,
                         "model.image.depth": 27, "model.image.mlp_dim": 4304,
                         "model.image.num_heads": 16, "model.text.width": 1152,
                         "model.text.depth": 27, "model.image.patch_size": 16,
                         "model.image.image_size": 256, "loss.self_distill_weight": 1.0,
                         "loss.masked_pred_weight": 0.25},
}


def test_every_experiment_is_listed():
    listed = {spec.split(":")[0] for spec in EXPERIMENTS}
    listed |= {f"experiments/{name}.py" for name in (*DERIVED, *STANDALONE)}
    files = {f"experiments/{p.name}" for p in pathlib.Path(
        __file__).parents[1].joinpath("experiments").glob("*.py") if p.name != "__init__.py"}
    later = {f"experiments/{spec.split(':')[0]}" for spec in AFTER_BASE}
    assert listed == files - later and not listed & later
    assert set(NEW_DEFAULTS) | set(DERIVED) | set(STANDALONE) == {
        pathlib.Path(f).stem for f in files - later}


@pytest.mark.parametrize("spec", AFTER_BASE)
def test_experiments_after_the_base_load(repo_root, spec):
    config = config_lib.load_config(str(repo_root / "experiments" / spec))
    assert config.name and config.model.name



@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_standalone_experiments_set_their_cited_values(repo_root, name):
    flat = _flat(json.loads(config_lib.to_json(config_lib.load_config(
        str(repo_root / "experiments" / f"{name}.py")))))
    assert {k: flat[k] for k in STANDALONE[name]} == STANDALONE[name]


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_experiments_differ_only_in_their_keys(repo_root, name):
    parent, variants, keys = DERIVED[name]
    for arg in variants:
        suffix = "" if arg is None else f":{arg}"
        load = lambda n: _flat(json.loads(config_lib.to_json(config_lib.load_config(  # noqa: E731
            str(repo_root / "experiments" / f"{n}.py") + suffix))))
        mine, base = load(name), load(parent)
        differ = {k for k in set(mine) | set(base) if mine.get(k, "<missing>") !=
                  base.get(k, "<missing>")}
        assert "name" in differ and differ <= keys, (arg, differ - keys)


@pytest.mark.parametrize("spec", sorted(EXPERIMENTS))
def test_experiment_configs_are_unchanged_by_the_base(repo_root, spec):
    """Every experiment (and variant) loads to the config the code loaded before the base config
    existed (tests/fixtures/experiment_configs/before_base_config.json, written by the code at
    4a01cc9): the same keys with the same values, plus the base's keys listed in NEW_DEFAULTS at
    their default. ``eval`` / ``evals`` are left out: they are not part of the base. A deliberate
    change of an experiment updates the fixture in the same commit."""
    before = {k: v for k, v in _flat(EXPERIMENTS[spec]).items()
              if k.split(".")[0] not in ("eval", "evals")}
    now = _flat(json.loads(config_lib.to_json(config_lib.load_config(str(repo_root / spec)))))
    now = {k: v for k, v in now.items() if k.split(".")[0] not in ("eval", "evals")}
    changed = {k: (v, now.get(k, "<missing>")) for k, v in before.items()
               if now.get(k, "<missing>") != v}
    assert not changed
    base = _flat(json.loads(config_lib.to_json(configs.base_config())))
    added = {k: v for k, v in now.items() if k not in before}
    assert set(added) == NEW_DEFAULTS[pathlib.Path(spec.split(":")[0]).stem]
    assert added == {k: base[k] for k in added}


def test_base_defaults_fill_a_config_that_lacks_them(tmp_path):
    """A file or config.json without some of the base's keys (written before they existed, or
    not starting from the base) loads with the defaults, and overrides reach them."""
    def get_config_source(extra=""):
        return ("def get_config(arg=None):\n"
                "    return dict(name='x', total_steps=10, batch_size=4,\n"
                "                optim=dict(lr=0.1, warmup_steps=2), model=dict(name='clip')"
                f"{extra})\n")

    (tmp_path / "exp.py").write_text(get_config_source())
    c = config_lib.load_config(str(tmp_path / "exp.py"), ["guard.nonfinite=skip"])
    defaults = configs.base_config()
    assert c.optim.lr == 0.1 and c.optim.warmup_steps == 2  # The file's values...
    assert c.optim.b2 == defaults.optim.b2 == 0.98  # ...and the base's for what it lacks.
    assert c.optim.trainable == "" and c.checkpoint.allow_data_change is False
    assert c.data.to_dict() == defaults.data.to_dict()
    assert c.axis_rules == defaults.axis_rules and c.guard.nonfinite == "skip"
    assert c.model.to_dict() == {"name": "clip"}  # Not in the base: taken as it is.

    saved = json.loads(config_lib.to_json(c))
    del saved["optim"]["trainable"], saved["checkpoint"]["allow_data_change"], saved["profile"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = config_lib.load_json_config(tmp_path / "config.json", ["profile.num_steps=3"])
    assert loaded.optim.trainable == "" and loaded.checkpoint.allow_data_change is False
    assert loaded.profile.to_dict() == {"start_step": 0, "num_steps": 3}
    assert loaded.guard.nonfinite == "skip"

    # Keys the base does not know fail, naming the key and the file, with a suggestion.
    (tmp_path / "typo.py").write_text(get_config_source(", checkpoint=dict(every_step=5)"))
    with pytest.raises(config_lib.ConfigError,
                       match=r"'checkpoint.every_step' in config file .*typo.py.*Did you mean "
                             r"'checkpoint.every_steps'"):
        config_lib.load_config(str(tmp_path / "typo.py"))
    saved["optim"]["lr_decay"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(config_lib.ConfigError, match=r"'optim.lr_decay' in .*config.json"):
        config_lib.load_json_config(tmp_path / "config.json")
    (tmp_path / "top.py").write_text(get_config_source(", total_step=5"))
    with pytest.raises(config_lib.ConfigError, match="Did you mean 'total_steps'"):
        config_lib.load_config(str(tmp_path / "top.py"))
    # A value of another type than the default's, and a required key left unset.
    (tmp_path / "type.py").write_text(get_config_source(", mesh=dict(fsdp=2.5)"))
    with pytest.raises(config_lib.ConfigError, match=r"'mesh.fsdp' .* 2.5"):
        config_lib.load_config(str(tmp_path / "type.py"))
    (tmp_path / "unset.py").write_text(
        "def get_config(arg=None):\n    return dict(name='x', batch_size=4)\n")
    with pytest.raises(config_lib.ConfigError, match="config.total_steps is not set"):
        config_lib.load_config(str(tmp_path / "unset.py"))
