"""The start-of-run check of the entries of config.evals against their datasets and the model.

An entry that cannot run on its data (or on the model) must stop `train` before step 0 and
`eval` before the checkpoint is read, from the dataset's metadata alone. The keys the metadata promises are
compared with the keys the loaders actually return (the reference); the "never decoded" claim
is checked with a dataset whose image bytes do not decode.
"""

import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from input_pipeline import DataError, eval_data
from tests.test_eval_data import (CLS_LABELS, CLS_NAMES, EvalDataTestClassification,
                                  _FakeCocoCaptions, _FakeImagenet2012, _prepare)
from vlm_jax import config as config_lib
from vlm_jax import main as main_lib
from vlm_jax import train
from vlm_jax.families import get_family


class EvalCheckCorruptImages(tfds.core.GeneratorBasedBuilder):
    """A classification dataset whose image bytes are not an image: any decode fails."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=CLS_NAMES),
            }),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i, label in enumerate(CLS_LABELS):
            yield i, {"image": b"these bytes are not an image %d" % i, "label": label}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_check_tfds")
    for builder_cls in (EvalDataTestClassification, _FakeCocoCaptions, _FakeImagenet2012,
                        EvalCheckCorruptImages):
        _prepare(builder_cls, root)
    return str(root)


def _config(repo_root, experiment, *overrides):
    return config_lib.load_config(f"{repo_root / 'experiments' / experiment}:test",
                                  list(overrides))


def _entry(name, type_, dataset="shapes", split="test", max_examples=0, **options):
    """A ``--config.evals=`` override with one entry."""
    entry = dict(type=type_, dataset=dataset, split=split, every_steps=0,
                 max_examples=max_examples, options=options)
    return f"evals={ {name: entry}!r}"


CASES = {  # name: (experiment, overrides without data dirs)
    "clip_shapes_probe": ("clip_tiny.py", _entry("probe", "linear_probe", max_examples=8,
                                                 probe_examples=8)),
    "clip_tfds_classification": ("clip_tiny.py", _entry(
        "cls", "zeroshot", "tfds:eval_data_test_classification")),
    "clip_tfds_imagenet": ("clip_tiny.py", _entry("imagenet", "zeroshot", "tfds:imagenet2012",
                                                  "validation")),
    "clip_tfds_captions": ("clip_tiny.py", _entry("coco", "retrieval", "tfds:coco_captions")),
    "flamingo_shapes": ("flamingo_tiny_shapes.py", _entry(
        "vqa", "fewshot_vqa", max_examples=4, fewshot_pool=4, fewshot_pool_split="train")),
    "flamingo_tfds_captions": ("flamingo_tiny_shapes.py", _entry(
        "coco", "fewshot_captioning", "tfds:coco_captions", fewshot_pool_split="test",
        fewshot_pool=2)),
    "lm_shapes": ("lm_tiny_shapes.py", "evals.lm_loss.max_examples=4"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_metadata_keys_are_the_loaded_keys(case, repo_root, shapes_data_dir, tfds_dir):
    """What the start check reads from metadata equals what the entry's loader then loads."""
    experiment, *overrides = CASES[case]
    config = _config(repo_root, experiment, f"data.data_dir={shapes_data_dir}",
                     f"eval.data_dir={tfds_dir}", *overrides)
    evaluation = train.make_evaluation(config, get_family(config).make_data(config, for_eval=True))
    for entry in evaluation.entries:
        assert evaluation.keys(entry) == set(evaluation.load(entry)), entry.name


def test_retrieval_on_classification_stops_before_step0_without_decoding(
        repo_root, shapes_data_dir, tfds_dir, tmp_path):
    name = EvalCheckCorruptImages.name
    with pytest.raises(Exception) as decoded:  # The reference: reading the images fails.
        eval_data.load_tfds_classification(name, split="test", data_dir=tfds_dir, image_size=32)
    assert not isinstance(decoded.value, config_lib.ConfigError)

    workdir = tmp_path / "run"
    entries = {n: dict(type=n, dataset=f"tfds:{name}", split="test", every_steps=0,
                       max_examples=0, options={}) for n in ("zeroshot", "retrieval")}
    config = _config(repo_root, "clip_tiny.py", f"data.data_dir={shapes_data_dir}",
                     f"eval.data_dir={tfds_dir}", f"evals={entries!r}")
    with pytest.raises(config_lib.ConfigError) as info:
        train.train_and_evaluate(config, str(workdir))
    message = str(info.value)
    assert "config.evals.retrieval" in message and f"tfds:{name}/test" in message
    assert "'retrieval' needs images with captions" in message
    assert "no ['text']" in message and "these evaluators run: ['zeroshot']" in message
    assert "config.evals.zeroshot" not in message
    assert not (workdir / "metrics.jsonl").exists()
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_imagenet_entry_retrieval_is_named(repo_root, shapes_data_dir, tfds_dir):
    """zeroshot and retrieval entries on ImageNet: only retrieval (it needs captions) fails."""
    config = _config(repo_root, "clip_tiny.py", f"data.data_dir={shapes_data_dir}",
                     "evals.retrieval.dataset=tfds:imagenet2012", f"eval.data_dir={tfds_dir}",
                     "evals.retrieval.split=validation")
    with pytest.raises(config_lib.ConfigError) as info:
        train.check_eval_data(config, get_family(config).make_data(config, for_eval=True))
    message = str(info.value)
    assert "config.evals.retrieval (type 'retrieval') on tfds:imagenet2012/validation" in message
    assert "config.evals.zeroshot" not in message and "run: ['zeroshot']" in message


def test_missing_tfds_dataset_or_split_is_reported_from_metadata(repo_root, shapes_data_dir,
                                                                  tfds_dir, tmp_path):
    config = _config(repo_root, "clip_tiny.py", f"data.data_dir={shapes_data_dir}",
                     "evals.zeroshot.dataset=tfds:cifar100", f"eval.data_dir={tmp_path}")
    with pytest.raises(DataError, match="'cifar100' is not prepared"):
        train.check_eval_data(config, get_family(config).make_data(config, for_eval=True))
    config = _config(repo_root, "flamingo_tiny_shapes.py", f"data.data_dir={shapes_data_dir}",
                     "evals.fewshot_captioning.dataset=tfds:coco_captions",
                     f"eval.data_dir={tfds_dir}")
    with pytest.raises(DataError, match="no split 'train'"):  # the in-context pool's split
        train.check_eval_data(config, get_family(config).make_data(config, for_eval=True),
                              ["fewshot_captioning"])


@pytest.mark.e2e
def test_train_command_stops_before_step0(repo_root, shapes_data_dir, tmp_path):
    """`vlm-jax train --config experiments/clip_tiny.py:test` with a fewshot_vqa entry used to
    train every step and fail at the first evaluation."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "train", "--config",
         str(repo_root / "experiments/clip_tiny.py") + ":test",
         "--config.evals.retrieval.type=fewshot_vqa", f"--config.data.data_dir={shapes_data_dir}",
         "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=repo_root, timeout=300,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Model clip" not in proc.stdout  # printed once training is set up
    assert not (workdir / "metrics.jsonl").exists()  # no train step was logged
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    err = proc.stderr
    assert "ConfigError" in err and "config.evals.retrieval (type 'fewshot_vqa')" in err
    assert "shapes/test" in err and "a Flamingo model: experiments/flamingo_tiny_shapes.py" in err
    assert "without 'interleaved'" in err
    assert "these evaluators run: ['zeroshot', 'retrieval', 'linear_probe']" in err


def test_eval_command_checks_before_reading_the_checkpoint(repo_root, shapes_data_dir, tmp_path,
                                                          capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "5").mkdir(parents=True)  # A step whose contents are missing.
    config = _config(repo_root, "clip_tiny.py", f"data.data_dir={shapes_data_dir}")
    with pytest.raises(Exception) as restore:  # The reference: this checkpoint cannot be read.
        train.evaluate_checkpoint(config, str(workdir))
    assert not isinstance(restore.value, config_lib.ConfigError)
    capsys.readouterr()
    assert main_lib.main(["eval", f"--config={repo_root / 'experiments/clip_tiny.py'}:test",
                          f"--config.data.data_dir={shapes_data_dir}", "--workdir", str(workdir),
                          "--config.evals.zeroshot.type=fewshot_vqa",
                          "--evaluators", "zeroshot"]) == 2
    err = capsys.readouterr().err
    assert "vlm-jax eval: ConfigError" in err and "config.evals.zeroshot" in err
    assert main_lib.main(["eval", f"--config={repo_root / 'experiments/clip_tiny.py'}:test",
                          f"--config.data.data_dir={shapes_data_dir}", "--workdir", str(workdir),
                          "--evaluators", "nonesuch"]) == 2
    err = capsys.readouterr().err
    assert "no entry ['nonesuch']" in err and "'linear_probe', 'retrieval', 'zeroshot'" in err
