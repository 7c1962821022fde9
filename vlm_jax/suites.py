"""Benchmark suites and CLIP_benchmark's dataset names.

CLIP_benchmark (``LAION-AI/CLIP_benchmark``, the ``clip-benchmark`` package) names each dataset
(``imagenet1k``, ``cifar10``, ``vtab/pets``, ``mscoco_captions``, ``tfds/<name>`` for any other
TFDS dataset); :func:`clip_benchmark_dataset` gives the name of a TFDS dataset read here, which
the result files of :func:`vlm_jax.evaluation.write_clip_benchmark` carry.

A suite is a named list of tasks (:data:`SUITES`), usable from the command line (``vlm-jax eval
--suite datacomp``) or a config (``c.evals = suites.suite_evals("datacomp", data_dir)[0]``).
``datacomp`` is the 38-task evaluation of DataComp (``mlfoundations/datacomp``, ``tasklist.yml``:
the 40 tasks there but FairFace and UTKFace, which have no ``main_metric`` and are left out of
its average, ``aggregate_scores.py``). DataComp reads every task from its own webdataset copies
(``download_evalsets.py``, Hugging Face ``djghosh/wds_<task>_test``) through CLIP_benchmark; here a
task whose data TFDS prepares, with the labels and the split of CLIP_benchmark's protocol, runs
from TFDS (``tfds`` set below); the others are listed with how to prepare them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# TFDS dataset (base name: no config, no version) -> CLIP_benchmark's name for the same data.
# Where CLIP_benchmark has a VTAB variant (read from TFDS with VTAB's splits) it is the one
# named, as DataComp names it; cifar10 is CLIP_benchmark's torchvision copy, the same test set.
CLIP_BENCHMARK_NAMES: dict[str, str] = {
    "imagenet2012": "imagenet1k",
    "imagenet_v2": "imagenetv2",
    "imagenet_sketch": "imagenet_sketch",
    "imagenet_a": "imagenet-a",
    "imagenet_r": "imagenet-r",
    "cifar10": "cifar10",
    "cifar100": "vtab/cifar100",
    "caltech101": "vtab/caltech101",
    "dtd": "vtab/dtd",
    "eurosat": "vtab/eurosat",
    "oxford_flowers102": "vtab/flowers",
    "oxford_iiit_pet": "vtab/pets",
    "patch_camelyon": "vtab/pcam",
    "resisc45": "vtab/resisc45",
    "svhn_cropped": "vtab/svhn",
    "clevr": "vtab/clevr_count_all",
    "kitti": "vtab/kitti_closest_vehicle_distance",
    "food101": "food101",
    "cars196": "cars",
    "stl10": "stl10",
    "mnist": "mnist",
    "sun397": "sun397",
    "coco_captions": "mscoco_captions",
}


def tfds_base_name(name: str) -> str:
    """``'coco_captions/2014:1.1.0'`` -> ``'coco_captions'``."""
    return name.split(":", 1)[0].split("/", 1)[0]


def clip_benchmark_dataset(dataset: str, split: str) -> str:
    """CLIP_benchmark's name of the data an entry reads (``dataset`` as in ``config.evals``):
    ``tfds:imagenet2012`` -> ``imagenet1k``, ``tfds:coco_captions`` -> ``mscoco_captions``, a
    TFDS dataset CLIP_benchmark does not name -> ``tfds/<name>`` (its own convention for TFDS
    datasets); the embedded dataset -> ``shapes/<split>`` (its held-out split is another test
    set); the held-out text of a corpus -> ``eval_files``. CLIP_benchmark records no split (its
    ``--split`` flag picks one): the result files add a ``split`` field."""
    if dataset == "shapes":
        return f"shapes/{split}"
    if not dataset.startswith("tfds:"):
        return dataset
    name = dataset[len("tfds:"):]
    return CLIP_BENCHMARK_NAMES.get(tfds_base_name(name), f"tfds/{name.split(':', 1)[0]}")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a suite.

    key: the suite's own name of the task (DataComp's ``tasklist.yml`` key); title: its display
    name (the ``dataset`` column of DataComp's results); clip_benchmark: CLIP_benchmark's dataset
    name (None: not a CLIP_benchmark dataset); task: ``zeroshot_classification`` /
    ``zeroshot_retrieval`` / DataComp's own; main_metric: the metric DataComp averages; tfds /
    split: the TFDS dataset and split this project runs it from (None: it does not, see
    ``prepare``); prepare: how to prepare the data; note: where the TFDS copy differs."""

    key: str
    title: str
    clip_benchmark: str | None
    task: str
    main_metric: str
    tfds: str | None = None
    split: str | None = None
    prepare: str = ""
    note: str = ""

    @property
    def runs_from_tfds(self) -> bool:
        return self.tfds is not None


_WDS = ("DataComp's webdataset copy: `python download_evalsets.py $DIR` in mlfoundations/datacomp "
        "(or Hugging Face djghosh/wds_{wds}_test), {how}")


def _t(key, title, cb, tfds=None, split="test", *, task="zeroshot_classification",
       metric="acc1", prepare="", note=""):
    if not prepare:
        wds = key.replace("/", "-")
        # DataComp reads its classification copies with CLIP_benchmark (eval_utils/wds_eval.py:
        # dataset wds/<key>); the others with its own code.
        how = (f"evaluated with CLIP_benchmark (`clip_benchmark eval --dataset wds/{key} "
               f"--dataset_root $DIR/wds_{wds}_test`)" if task == "zeroshot_classification"
               else "scored by DataComp's evaluate.py")
        prepare = _WDS.format(wds=wds, how=how)
    return Task(key, title, cb, task, metric, tfds, split if tfds else None, prepare, note)


_SUBSET_200 = ("TFDS {t} labels its images with the 1000 ImageNet classes; CLIP_benchmark scores "
               "them among the 200 classes of the dataset, a class subset not implemented here")
_DERIVED = ("TFDS {t} prepares the images, but VTAB's label (derived from the object "
            "annotations) is not a TFDS feature")

# mlfoundations/datacomp tasklist.yml, in its order.
DATACOMP: tuple[Task, ...] = (
    _t("vtab/caltech101", "Caltech-101", "vtab/caltech101", "caltech101",
       metric="mean_per_class_recall"),
    _t("cifar10", "CIFAR-10", "cifar10", "cifar10"),
    _t("vtab/cifar100", "CIFAR-100", "vtab/cifar100", "cifar100"),
    _t("vtab/clevr_count_all", "CLEVR Counts", "vtab/clevr_count_all",
       note=_DERIVED.format(t="clevr")),
    _t("vtab/clevr_closest_object_distance", "CLEVR Distance",
       "vtab/clevr_closest_object_distance", note=_DERIVED.format(t="clevr")),
    _t("country211", "Country211", "country211", note="not in TFDS"),
    _t("vtab/dtd", "Describable Textures", "vtab/dtd", "dtd"),
    # VTAB's EuroSAT / RESISC45 test sets: the last 20% of TFDS's single split.
    _t("vtab/eurosat", "EuroSAT", "vtab/eurosat", "eurosat/rgb", "train[21600:]"),
    _t("fgvc_aircraft", "FGVC Aircraft", "fgvc_aircraft", metric="mean_per_class_recall",
       note="not in TFDS"),
    _t("food101", "Food-101", "food101", "food101", "validation"),
    _t("gtsrb", "GTSRB", "gtsrb", note="not in TFDS"),
    _t("imagenet1k", "ImageNet 1k", "imagenet1k", "imagenet2012", "validation"),
    _t("imagenet_sketch", "ImageNet Sketch", "imagenet_sketch", "imagenet_sketch"),
    _t("imagenetv2", "ImageNet v2", "imagenetv2", "imagenet_v2"),
    _t("imagenet-a", "ImageNet-A", "imagenet-a", note=_SUBSET_200.format(t="imagenet_a")),
    _t("imagenet-o", "ImageNet-O", "imagenet-o", note="not in TFDS"),
    _t("imagenet-r", "ImageNet-R", "imagenet-r", note=_SUBSET_200.format(t="imagenet_r")),
    _t("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance",
       "vtab/kitti_closest_vehicle_distance", note=_DERIVED.format(t="kitti")),
    _t("mnist", "MNIST", "mnist", "mnist"),
    _t("objectnet", "ObjectNet", "objectnet", note="not in TFDS (licence: download from "
       "objectnet.dev)"),
    _t("vtab/flowers", "Oxford Flowers-102", "vtab/flowers", "oxford_flowers102",
       metric="mean_per_class_recall"),
    _t("vtab/pets", "Oxford-IIIT Pet", "vtab/pets", "oxford_iiit_pet",
       metric="mean_per_class_recall"),
    _t("voc2007", "Pascal VOC 2007", "voc2007",
       note="TFDS voc/2007 holds detection annotations; CLIP_benchmark classifies object crops"),
    _t("vtab/pcam", "PatchCamelyon", "vtab/pcam", "patch_camelyon"),
    _t("renderedsst2", "Rendered SST2", "renderedsst2", note="not in TFDS"),
    _t("vtab/resisc45", "RESISC45", "vtab/resisc45", "resisc45", "train[25200:]"),
    _t("cars", "Stanford Cars", "cars", "cars196"),
    _t("stl10", "STL-10", "stl10", note="TFDS stl10 prepares it, but its labels are unnamed "
       "('0'...'9') and the class names are not shipped here yet"),
    _t("sun397", "SUN397", "sun397", note="TFDS sun397 labels are paths ('/a/abbey'), and its "
       "test split holds 21,750 of the 108,754 images DataComp scores"),
    _t("vtab/svhn", "SVHN", "vtab/svhn", "svhn_cropped"),
    _t("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "flickr30k",
       task="zeroshot_retrieval", metric="mean_recall@1", note="not in TFDS"),
    _t("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mscoco_captions",
       "coco_captions/2014", task="zeroshot_retrieval", metric="mean_recall@1",
       note="Karpathy 5k test split, as DataComp's"),
    _t("misc/winogavil", "WinoGAViL", None, task="winogavil", metric="jaccard_score_10-12",
       note="DataComp's own evaluation (eval_utils/wino_eval.py), not CLIP_benchmark"),
    _t("wilds/iwildcam", "iWildCam", None, task="wilds", metric="F1-macro_all",
       note="DataComp's own evaluation (eval_utils/wilds_eval.py)"),
    _t("wilds/camelyon17", "Camelyon17", None, task="wilds", metric="acc1",
       note="DataComp's own evaluation (eval_utils/wilds_eval.py)"),
    _t("wilds/fmow", "FMoW", None, task="wilds", metric="acc_worst_region",
       note="DataComp's own evaluation (eval_utils/wilds_eval.py)"),
    _t("fairness/dollar_street", "Dollar Street", None, task="fairness", metric="acc_top5_wg",
       note="DataComp's own evaluation (eval_utils/fairness_eval.py)"),
    _t("fairness/geode", "GeoDE", None, task="fairness", metric="acc_wg",
       note="DataComp's own evaluation (eval_utils/fairness_eval.py)"),
)

SUITES: dict[str, tuple[Task, ...]] = {"datacomp": DATACOMP}
_EVALUATOR = {"zeroshot_classification": "zeroshot", "zeroshot_retrieval": "retrieval"}


def entry_name(task: Task) -> str:
    """The ``config.evals`` name of a suite task: its key with ``/`` and ``-`` as ``_``
    (``vtab/pets`` -> ``vtab_pets``): a config key and a ``--evaluators`` name."""
    return task.key.replace("/", "_").replace("-", "_")


def suite_tasks(suite: str) -> tuple[Task, ...]:
    """The tasks of ``suite``.

    Raises:
        ConfigError: unknown suite (naming the known ones).
    """
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: unknown suite; the suites are {sorted(SUITES)}.")
    return SUITES[suite]


def suite_evals(suite: str, data_dir: str | None, max_examples: int = 0, every_steps: int = -1
                ) -> tuple[dict[str, dict[str, Any]], list[tuple[Task, str]]]:
    """``config.evals`` entries for the tasks of ``suite`` that run here, and the others with
    what to do.

    Args:
        suite: a name of :data:`SUITES`.
        data_dir: the TFDS directory (``config.eval.data_dir``; None: ``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).
        max_examples: per entry (0: the whole split).
        every_steps: of each entry (-1: on request, ``vlm-jax eval --suite``; 0: also at the
            end of training).

    Returns:
        ``(entries, skipped)``: ``entries`` maps :func:`entry_name` to an entry for each task
        TFDS prepares that is prepared in ``data_dir`` (checked from its metadata files);
        ``skipped`` lists ``(task, reason)`` for the others: the ``tfds build`` command of a
        TFDS task not prepared yet, else how to prepare the task's data.
    """
    from input_pipeline import DataError, eval_data  # pylint: disable=C0415

    entries: dict[str, dict[str, Any]] = {}
    skipped: list[tuple[Task, str]] = []
    for task in suite_tasks(suite):
        if not task.runs_from_tfds:
            skipped.append((task, f"{task.note}; prepare: {task.prepare}"))
        else:
            try:  # From the prepared files' metadata alone, as a run checks its entries.
                eval_data.open_builder(task.tfds, [task.split], data_dir)
            except DataError as e:
                skipped.append((task, str(e)))
                continue
            entries[entry_name(task)] = dict(
                type=_EVALUATOR[task.task], dataset=f"tfds:{task.tfds}", split=task.split,
                every_steps=int(every_steps), max_examples=int(max_examples),
                options={})
    return entries, skipped


def summary(suite: str, results: Mapping[str, float], skipped: list[tuple[Task, str]]) -> str:
    """A markdown table of ``suite``: each task's main metric (DataComp's choice; retrieval's
    ``mean_recall@1`` is the mean of image and text recall@1) from ``results``
    (``<entry>/<metric>``), or why it did not run; and the mean over the tasks that ran."""
    why = {t.key: reason for t, reason in skipped}
    lines = [f"| {suite} task | CLIP_benchmark dataset | main metric | value |",
             "|---|---|---|---|"]
    values = []
    for task in suite_tasks(suite):
        name = entry_name(task)
        if task.main_metric == "mean_recall@1":
            parts = [results.get(f"{name}/{k}_retrieval_recall@1") for k in ("image", "text")]
            value = None if None in parts else sum(parts) / 2
        else:
            value = results.get(f"{name}/{task.main_metric}")
        if value is None:
            shown = "not run: " + why.get(task.key, "not evaluated")
        else:
            values.append(value)
            shown = f"{100 * value:.2f}"
        lines.append(f"| {task.title} | {task.clip_benchmark or '-'} | {task.main_metric} | "
                     f"{shown} |")
    n = len(suite_tasks(suite))
    mean = f"{100 * sum(values) / len(values):.2f}" if values else "-"
    lines.append(f"| mean over the {len(values)} of {n} tasks run | | | {mean} |")
    return "\n".join(lines)
