"""Result files in CLIP_benchmark's layout (vlm_jax/evaluation.py: write_clip_benchmark) and the
DataComp suite (vlm_jax/suites.py).

References: files written by the real ``clip_benchmark eval`` (tests/fixtures/clip_benchmark,
made by make_fixture.py there), and, where the package is importable (the torch environment:
``/work/venvs/torch/bin/python -m pytest -m clip_benchmark tests/test_clip_benchmark.py``), its
own aggregation, ``clip_benchmark build``, run over our files; DataComp's ``tasklist.yml``.
"""

import csv
import inspect
import json
import math
import pathlib
import uuid

import numpy as np
import pytest
from etils import epath

from tests.test_eval_data import _FakeCifar10, _FakeCocoCaptions, _prepare
from vlm_jax import config as config_lib
from vlm_jax import evaluation as evaluation_lib
from vlm_jax import main as main_lib
from vlm_jax import suites, train
from vlm_jax.evaluators import retrieval, zeroshot
from vlm_jax.families import get_family

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "clip_benchmark"
CB_FILES = {"zeroshot_classification": "dummy_epoch_1.pt_ViT-S-32_en_zeroshot_classification.json",
            "zeroshot_retrieval": "mscoco_captions_epoch_1.pt_ViT-S-32_en_zeroshot_retrieval.json"}
EXTRA_FIELDS = ["entry", "split", "step"]  # ours, after CLIP_benchmark's fields
CB_TEMPLATE = "{dataset}_{pretrained}_{model}_{language}_{task}.json"  # its --output default


def _cb(task):
    return json.loads((FIXTURES / CB_FILES[task]).read_text())


def _entry(type_, dataset="shapes", split="test", max_examples=0):
    return dict(type=type_, dataset=dataset, split=split, every_steps=0,
                max_examples=max_examples, options={})


def _run_files(repo_root, workdir: epath.Path):
    """What a clip_tiny run whose evaluation read shapes (two splits) and COCO captions writes,
    with metrics from the evaluators' own functions (random embeddings)."""
    entries = dict(zeroshot=_entry("zeroshot"), heldout=_entry("zeroshot", split="test_heldout"),
                   coco=_entry("retrieval", dataset="tfds:coco_captions/2014"),
                   probe=_entry("linear_probe"))
    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}:test",
                                    [f"evals={entries!r}"])
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(20, 10)), rng.integers(0, 10, 20)
    zs = {"acc1": zeroshot.topk_accuracy(logits, labels, 1),
          "acc5": zeroshot.topk_accuracy(logits, labels, 5),
          "mean_per_class_recall": zeroshot.mean_per_class_recall(logits.argmax(1), labels, 10)}
    rt = retrieval.recall_at_k(rng.normal(size=(10, 8)), rng.normal(size=(20, 8)),
                               np.repeat(np.arange(10), 2))
    results = {**{f"zeroshot/{k}": v for k, v in zs.items()},
               **{f"heldout/{k}": v / 2 for k, v in zs.items()},
               **{f"coco/{k}": v for k, v in rt.items()},
               **{f"probe/{k}": v / 3 for k, v in zs.items()}, "probe/fewshot_1shot_acc1": 0.25}
    evaluation_lib.write_results(workdir, config, evaluation_lib.parse_entries(config), 6,
                                 results)
    return workdir, config, results


def test_files_have_clip_benchmarks_layout(repo_root, tmp_path):
    """Our files against files clip_benchmark itself wrote: one JSON object per dataset and
    task, its fields in its order (then ours), its types, its metric names per task, its
    dataset name for COCO, and its file name template."""
    workdir, config, results = _run_files(repo_root, epath.Path(tmp_path) / "tiny")
    out = workdir / "clip_benchmark"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["mscoco_captions_tiny_step6_clip_tiny_en_zeroshot_retrieval.json",
                     "shapes_test_heldout_tiny_step6_clip_tiny_en_zeroshot_classification.json",
                     "shapes_test_tiny_step6_clip_tiny_en_linear_probe.json",
                     "shapes_test_tiny_step6_clip_tiny_en_zeroshot_classification.json"]
    for task, cb_name in CB_FILES.items():  # the fixture follows the template ...
        cb = _cb(task)
        assert cb_name == CB_TEMPLATE.format(
            dataset=cb["dataset"].replace("/", "_"), pretrained=pathlib.Path(cb["pretrained"]).name,
            model=cb["model"], language=cb["language"], task=cb["task"])
    for name in names:  # ... and so do ours
        record = json.loads((out / name).read_text())
        assert isinstance(record, dict)  # one object per file, not a list
        # clip_benchmark's linear probe needs CUDA (no fixture file): the same fields, its
        # metric names (checked against its source in the clip_benchmark-marked test).
        cb = _cb(record["task"] if record["task"] in CB_FILES else "zeroshot_classification")
        assert list(record) == list(cb) + EXTRA_FIELDS
        for k in cb:
            assert type(record[k]) is type(cb[k]), k
        if record["task"] in CB_FILES:
            assert set(record["metrics"]) == set(cb["metrics"])
        else:
            assert set(record["metrics"]) == {f"lp_{k}" for k in cb["metrics"]} | {
                "fewshot_1shot_acc1"}
        assert all(isinstance(v, float) for v in record["metrics"].values())
        assert name == CB_TEMPLATE.format(
            dataset=record["dataset"].replace("/", "_"), pretrained="tiny_step6",
            model=record["model"], language=record["language"], task=record["task"])
        assert record["model"] == config.name and record["language"] == "en"
        assert record["pretrained"] == str(workdir / "checkpoints" / "6")
        assert record["step"] == 6
        for k, v in record["metrics"].items():
            assert v == results[f"{record['entry']}/{k.removeprefix('lp_')}"]
    coco = json.loads((out / names[0]).read_text())
    assert coco["metrics"].keys() == _cb("zeroshot_retrieval")["metrics"].keys()
    assert coco["dataset"] == _cb("zeroshot_retrieval")["dataset"] == "mscoco_captions"
    assert coco["split"] == "test" and coco["entry"] == "coco"


@pytest.mark.clip_benchmark
def test_clip_benchmark_build_reads_our_files(repo_root, tmp_path):
    """clip_benchmark's own aggregation (`clip_benchmark build`) over our directory and its own
    files: one table, our rows with our numbers, sharing its metric columns."""
    cli = pytest.importorskip("clip_benchmark.cli")
    import argparse  # pylint: disable=import-outside-toplevel

    workdir, config, results = _run_files(repo_root, epath.Path(tmp_path) / "tiny")
    renamed = evaluation_lib.CLIP_BENCHMARK_METRICS
    from clip_benchmark.metrics import linear_probe  # pylint: disable=C0415

    source = inspect.getsource(linear_probe.evaluate)
    assert all(f'"{name}"' in source for name in renamed["linear_probe"].values())
    table = tmp_path / "benchmark.csv"
    cli.main_build(argparse.Namespace(
        files=[str(workdir / "clip_benchmark"), *(str(FIXTURES / f) for f in CB_FILES.values())],
        output=str(table)))
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    print(table.read_text())
    assert len(rows) == 6
    ours = [r for r in rows if r["model"] == config.name]
    assert sorted(r["dataset"] for r in ours) == ["mscoco_captions", "shapes/test", "shapes/test",
                                                  "shapes/test_heldout"]
    for r in ours:
        assert r["model_fullname"] == f"{config.name} {workdir / 'checkpoints' / '6'}"
        for k, v in results.items():
            if k.startswith(r["entry"] + "/"):
                metric = k.split("/", 1)[1]
                column = renamed.get(r["task"], {}).get(metric, metric)
                assert math.isclose(float(r[column]), v, rel_tol=1e-12), k
    theirs = next(r for r in rows if r["dataset"] == "mscoco_captions" and r not in ours)
    assert theirs.keys() == ours[0].keys()  # one table: the same columns


def test_files_on_gcs(gcs_emulator, repo_root):
    """A gs:// workdir (the GCS API emulator): the same files, in the bucket."""
    import gcsfs  # pylint: disable=import-outside-toplevel

    bucket = gcs_emulator.create_bucket(f"vlm-cb-{uuid.uuid4().hex[:10]}")  # gs://<name>
    workdir, _, results = _run_files(repo_root, epath.Path(f"{bucket}/tiny"))
    fs = gcsfs.GCSFileSystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/tiny/clip_benchmark"))
    assert len(names) == 4 and all(n.endswith(".json") for n in names)
    coco = json.loads(fs.cat(f"{bucket}/tiny/clip_benchmark/{names[0]}"))
    assert coco["dataset"] == "mscoco_captions"
    assert coco["pretrained"] == f"{bucket}/tiny/checkpoints/6" == str(workdir / "checkpoints/6")
    assert coco["metrics"]["text_retrieval_recall@1"] == results["coco/text_retrieval_recall@1"]


def test_captioning_metrics_get_pycocoevalcaps_names():
    """clip_benchmark's captioning task reports pycocoevalcap's COCOEvalCap scores by their
    names there: our files rename ours to those."""
    coco_eval = pytest.importorskip("pycocoevalcap.eval")
    source = inspect.getsource(coco_eval.COCOEvalCap.evaluate)
    for theirs in evaluation_lib.CLIP_BENCHMARK_METRICS["captioning"].values():
        assert f'"{theirs}"' in source, theirs


@pytest.fixture(scope="module")
def two_prepared(tmp_path_factory):
    """A TFDS directory holding two DataComp tasks' datasets (TFDS' cifar10 and
    coco_captions/2014 layouts, a few generated images)."""
    root = tmp_path_factory.mktemp("datacomp_tfds")
    for builder_cls in (_FakeCifar10, _FakeCocoCaptions):
        _prepare(builder_cls, root)
    return str(root)


def test_datacomp_suite_lists_38_tasks_and_runs_the_prepared(repo_root, shapes_data_dir,
                                                             two_prepared, tmp_path):
    """DataComp's tasklist.yml (the 38 tasks with a main metric); the tasks prepared in
    config.eval.data_dir run (a random clip_tiny model), written under CLIP_benchmark's names;
    the others are reported with how to prepare them."""
    tasks = suites.suite_tasks("datacomp")
    assert len(tasks) == 38 == len({t.key for t in tasks})
    assert {"imagenet1k", "vtab/pets", "retrieval/mscoco_2014_5k_test_image_text_retrieval",
            "fairness/geode", "misc/winogavil"} <= {t.key for t in tasks}
    entries, skipped = suites.suite_evals("datacomp", two_prepared, max_examples=0)
    assert sorted(entries) == ["cifar10", "retrieval_mscoco_2014_5k_test_image_text_retrieval"]
    why = {t.key: reason for t, reason in skipped}
    assert len(why) == 36
    assert "tfds build mnist" in why["mnist"]  # TFDS prepares it: the command
    assert "download_evalsets.py" in why["country211"]  # not TFDS: DataComp's copy
    assert "manual download" in why["imagenet1k"]

    config = config_lib.load_config(f"{repo_root / 'experiments/clip_tiny.py'}:test",
                                     [f"data.data_dir={shapes_data_dir}",
                                      f"eval.data_dir={two_prepared}", f"evals={entries!r}"])
    s = train.setup(config)
    data = get_family(config).make_data(config, for_eval=True)
    evaluation = train.check_eval_data(config, data, list(entries))
    results = train.evaluate(s, s.init_fn()["params"], evaluation)
    workdir = epath.Path(tmp_path)
    evaluation_lib.write_results(workdir, config, evaluation.entries, 0, results)
    written = {json.loads(p.read_text())["dataset"]: json.loads(p.read_text())
               for p in (workdir / "clip_benchmark").iterdir()}
    assert set(written) == {"cifar10", "mscoco_captions"}
    assert written["cifar10"]["task"] == "zeroshot_classification"
    table = suites.summary("datacomp", results, skipped)
    coco = "retrieval_mscoco_2014_5k_test_image_text_retrieval"
    mean_r1 = (results[f"{coco}/image_retrieval_recall@1"]
               + results[f"{coco}/text_retrieval_recall@1"]) / 2
    assert f"| CIFAR-10 | cifar10 | acc1 | {100 * results['cifar10/acc1']:.2f} |" in table
    assert f"| MSCOCO | mscoco_captions | mean_recall@1 | {100 * mean_r1:.2f} |" in table
    assert table.count("not run: ") == 36
    mean = (results["cifar10/acc1"] + mean_r1) / 2
    assert f"| mean over the 2 of 38 tasks run | | | {100 * mean:.2f} |" in table


def test_eval_suite_without_prepared_data_reports_each_task(repo_root, tmp_path, capsys):
    """`vlm-jax eval --suite datacomp` with nothing prepared: every task listed with how to
    prepare it; nothing is loaded."""
    empty = tmp_path / "tfds"
    empty.mkdir()
    code = main_lib.main(["eval", "--workdir", str(tmp_path / "run"), "--suite", "datacomp",
                          f"--config={repo_root / 'experiments/clip_tiny.py'}:test",
                          f"--config.eval.data_dir={empty}"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("not run: ") == 38
    assert f"TFDS dataset 'cifar10' is not prepared in data_dir {empty}" in out
    assert main_lib.main(["eval", "--workdir", str(tmp_path), "--suite", "nope",
                          f"--config={repo_root / 'experiments/clip_tiny.py'}:test"]) == 2
