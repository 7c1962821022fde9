"""Named evaluation entries (vlm_jax/evaluation.py): built and compiled once per run, each on its
own dataset, reported under its name; a misfit entry is refused before step 0.

References: compile events counted by jax.monitoring (what XLA actually traces and compiles);
the numbers of a fresh evaluation (a new extractor, as every evaluation used to build) for the
same parameters; the same entry run alone by `vlm-jax eval` on the trained checkpoint.
"""

import json
import re

import jax
import pytest

from tests.test_eval_data import EvalDataTestClassification, _FakeCocoCaptions, _prepare
from vlm_jax import config as config_lib
from vlm_jax import data as data_lib
from vlm_jax import main as main_lib
from vlm_jax import train
from vlm_jax.evaluation import parse_entries
from vlm_jax.families import get_family

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_counts = {"on": False, "n": 0}


def _listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if _counts["on"] and event in _COMPILE_EVENTS:
        _counts["n"] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


def _compiles(fn):
    """``fn()``'s result and the number of traces / lowerings / compilations it caused (a hit
    of the persistent compilation cache still traces and lowers: it counts)."""
    _counts.update(on=True, n=0)
    try:
        out = fn()
    finally:
        _counts["on"] = False
    return out, _counts["n"]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation_tfds")
    for builder_cls in (EvalDataTestClassification, _FakeCocoCaptions):
        _prepare(builder_cls, root)
    return str(root)


def _entry(type_, dataset="shapes", split="test", max_examples=32, **options):
    return dict(type=type_, dataset=dataset, split=split, every_steps=0,
                max_examples=max_examples, options=options)


def _config(repo_root, *overrides, experiment="clip_tiny.py"):
    return config_lib.load_config(f"{repo_root / 'experiments' / experiment}:test",
                                  list(overrides))


@pytest.mark.parametrize("experiment, entries", [
    ("clip_tiny.py", dict(zeroshot=_entry("zeroshot"),
                          heldout=_entry("retrieval", split="test_heldout"),
                          probe=_entry("linear_probe", probe_examples=256, shots=[1]))),
    ("lm_tiny_shapes.py", dict(lm_loss=_entry("lm_loss", split="validation", max_examples=8))),
    ("coca_tiny_shapes.py", dict(greedy=_entry("captioning", max_examples=8, method="greedy"),
                                 beam=_entry("captioning", max_examples=8, method="beam",
                                             beam_size=2))),
])
def test_later_evaluations_compile_nothing(repo_root, shapes_data_dir, experiment, entries):
    config = _config(repo_root, f"data.data_dir={shapes_data_dir}", f"evals={entries!r}",
                     experiment=experiment)
    s = train.setup(config)
    data = get_family(config).make_data(config, for_eval=True)
    evaluation = train.check_eval_data(config, data)
    params = s.init_fn()["params"]
    scale = jax.jit(lambda p, f: jax.tree.map(lambda x: x * f, p),
                    out_shardings=s.param_shardings)
    runs = []
    for i, factor in enumerate((1.0, 0.5, 2.0)):
        p = scale(params, factor)  # other parameters each time (compiled outside the count)
        out, n = _compiles(lambda p=p: train.evaluate(s, p, evaluation))
        runs.append((p, out, n))
        print(f"{experiment} evaluation {i + 1}: {n} traces/lowerings/compilations")
    assert runs[0][2] > 0  # The listener sees compilations: the first evaluation has some.
    assert runs[1][2] == 0 and runs[2][2] == 0
    assert {k.split("/", 1)[0] for k in runs[0][1]} == set(entries)  # keyed by entry name
    # Not stale: each evaluation equals a fresh one (a new extractor, retraced) of its params.
    fresh = train.make_evaluation(config, data)
    p, out, _ = runs[2]
    ref, n_fresh = _compiles(lambda: train.evaluate(s, p, fresh))
    assert n_fresh > 0  # ... which compiles again: what every evaluation used to cost.
    assert out.keys() == ref.keys()
    for k in ref:
        assert out[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-6), k


@pytest.mark.e2e
def test_three_named_entries_on_three_datasets(repo_root, shapes_data_dir, tfds_dir, tmp_path,
                                               capsys):
    """clip_tiny.py:test with zeroshot on shapes test, zeroshot on shapes test_heldout and
    zeroshot on a TFDS classification dataset: all three reported under their names, in
    metrics.jsonl and in one results file per dataset and split; the TFDS entry alone via
    `vlm-jax eval` gives the same numbers."""
    tfds_name = EvalDataTestClassification.name
    entries = dict(zeroshot=_entry("zeroshot", max_examples=128),
                   heldout=_entry("zeroshot", split="test_heldout", max_examples=128),
                   tiny=_entry("zeroshot", dataset=f"tfds:{tfds_name}", max_examples=0))
    workdir = tmp_path / "run"
    args = [f"--config={repo_root / 'experiments/clip_tiny.py'}:test",
            f"--config.data.data_dir={shapes_data_dir}", f"--config.eval.data_dir={tfds_dir}"]
    assert main_lib.main(["train", *args, f"--config.evals={entries!r}",
                          "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = next(m for m in metrics if "eval/tiny/acc1" in m)
    assert final["step"] == 6
    for name in entries:
        assert {f"eval/{name}/acc1", f"eval/{name}/mean_per_class_recall"} <= set(final)
        assert f"| {name}/acc1 |" in out
    files = {"zeroshot": "eval_results_test.json", "heldout": "eval_results_test_heldout.json",
             "tiny": f"eval_results_tfds_{tfds_name}_test.json"}
    for name, file in files.items():
        (record,) = json.loads((workdir / file).read_text())
        assert record["entry"] == name and record["dataset"] == entries[name]["dataset"]
        assert record["split"] == entries[name]["split"]
        assert record["task"] == "zeroshot_classification" and record["step"] == 6
        assert record["metrics"]["acc1"] == final[f"eval/{name}/acc1"]
    assert final["eval/zeroshot/acc1"] != final["eval/heldout/acc1"] or \
        final["eval/zeroshot/mean_per_class_recall"] != final["eval/heldout/mean_per_class_recall"]

    # The reference: the TFDS entry alone, from the run's config.json, on the last checkpoint.
    (workdir / files["tiny"]).unlink()
    assert main_lib.main(["eval", "--workdir", str(workdir), "--evaluators", "tiny"]) == 0
    (alone,) = json.loads((workdir / files["tiny"]).read_text())
    for k, v in alone["metrics"].items():
        assert v == pytest.approx(final[f"eval/tiny/{k}"], abs=1e-9), k
    assert not (workdir / "eval_results_test_heldout.json").read_text().count('"tiny"')

    # The same entry moved to another dataset from the command line.
    assert main_lib.main(["eval", "--workdir", str(workdir), "--evaluators", "tiny",
                          "--dataset", "shapes", "--split", "test_heldout"]) == 0
    records = json.loads((workdir / files["heldout"]).read_text())
    assert {r["entry"] for r in records} == {"heldout", "tiny"}
    moved = next(r for r in records if r["entry"] == "tiny")["metrics"]
    # 'tiny' (all 128 images) reads what 'heldout' (max_examples=128) read: the same numbers.
    for k, v in moved.items():
        assert v == pytest.approx(final[f"eval/heldout/{k}"], abs=1e-9), k


def test_misfit_entry_is_refused_before_step0(repo_root, shapes_data_dir, tfds_dir, tmp_path):
    """zeroshot on a captions dataset: no labels; refused from metadata before step 0."""
    entries = dict(zeroshot=_entry("zeroshot"),
                   coco_zs=_entry("zeroshot", dataset="tfds:coco_captions"))
    config = _config(repo_root, f"data.data_dir={shapes_data_dir}", f"eval.data_dir={tfds_dir}",
                     f"evals={entries!r}")
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError) as info:
        train.train_and_evaluate(config, str(workdir))
    message = str(info.value)
    assert "config.evals.coco_zs (type 'zeroshot') on tfds:coco_captions/test" in message
    assert "no ['label', 'class_names', 'templates']" in message
    assert "these evaluators run: ['retrieval', 'captioning']" not in message  # CLIP: no caption
    assert "these evaluators run: ['retrieval']" in message
    assert "config.evals.zeroshot " not in message
    assert not (workdir / "metrics.jsonl").exists()


def test_entry_fields_are_checked(repo_root):
    for override, match in [
            ("evals.zeroshot.type=nonesuch", "config.evals.zeroshot.type='nonesuch'"),
            ("evals.zeroshot.dataset=cifar10", "config.evals.zeroshot.dataset='cifar10'"),
            ("evals.zeroshot.every_steps=-2", "config.evals.zeroshot: every_steps=-2"),
            ("evals.linear_probe.options={'probe_exampels': 8}",
             "config.evals.linear_probe.options: unknown option(s) ['probe_exampels']")]:
        with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
            parse_entries(_config(repo_root, override), ["zeroshot", "linear_probe"])
    config = _config(repo_root, "evals={'x': {'type': 'zeroshot', 'datset': 'shapes'}}")
    with pytest.raises(config_lib.ConfigError, match=r"config\.evals\.x: unknown field.*datset"):
        parse_entries(config)
    # Left-out fields take their defaults; the on-request entry runs only when named.
    names = [e.name for e in parse_entries(_config(repo_root))]
    assert names == ["retrieval", "zeroshot"]
    (probe,) = parse_entries(_config(repo_root), ["linear_probe"])
    assert probe.every_steps == -1 and probe.data_options()["probe_examples"] == 256
    assert probe.evaluator_options() == {"shots": [1, 2]}


def test_tfds_entry_does_not_build_shapes(repo_root, shapes_data_dir, tfds_dir, tmp_path):
    """Checking and loading a tfds: entry reads only that dataset: a shapes data_dir that holds
    nothing stays empty (a shapes entry would build the dataset there)."""
    import types

    config = _config(repo_root, f"data.data_dir={tmp_path / 'no_shapes'}",
                     f"eval.data_dir={tfds_dir}",
                     f"evals={ {'coco': _entry('retrieval', 'tfds:coco_captions')} !r}")
    tokenizer = data_lib.prepare(_config(repo_root, f"data.data_dir={shapes_data_dir}"),
                                 for_eval=True).tokenizer
    data = types.SimpleNamespace(tokenizer=tokenizer, data_dir=str(tmp_path / "no_shapes"))
    evaluation = train.make_evaluation(config, data)
    evaluation.check()
    loaded = evaluation.load(evaluation.entries[0])
    assert loaded["image"].shape[0] == 3 and len(loaded["text"]) == 8
    assert not (tmp_path / "no_shapes").exists()
