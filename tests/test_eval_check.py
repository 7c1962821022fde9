"""The start-of-run check of config.eval.evaluators against the evaluation dataset.

An evaluator that cannot run on its data must stop `train` before step 0 and `eval` before the
checkpoint is read, from the dataset's metadata alone. The keys the metadata promises are
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
from vlm_jax.families import get_family
from vlm_jax import main as main_lib
from vlm_jax import train


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


CASES = {  # name: (experiment, overrides without data dirs)
    "clip_shapes_probe": ("clip_tiny.py", "eval.evaluators=['linear_probe']",
                          "eval.probe_examples=8", "eval.max_examples=8"),
    "clip_tfds_classification": ("clip_tiny.py", "eval.evaluators=['zeroshot']",
                                 "eval.dataset=tfds:eval_data_test_classification"),
    "clip_tfds_imagenet": ("clip_tiny.py", "eval.evaluators=['zeroshot']",
                           "eval.dataset=tfds:imagenet2012", "eval.split=validation"),
    "clip_tfds_captions": ("clip_tiny.py", "eval.evaluators=['retrieval']",
                           "eval.dataset=tfds:coco_captions"),
    "flamingo_shapes": ("flamingo_tiny_shapes.py", "eval.max_examples=4", "eval.fewshot_pool=4"),
    "flamingo_tfds_captions": ("flamingo_tiny_shapes.py", "eval.dataset=tfds:coco_captions",
                               "eval.fewshot_pool_split=test", "eval.fewshot_pool=2"),
    "lm_shapes": ("lm_tiny_shapes.py", "eval.max_examples=4"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_metadata_keys_are_the_loaded_keys(case, repo_root, shapes_data_dir, tfds_dir):
    """What the start check reads from metadata equals what eval_split then loads."""
    experiment, *overrides = CASES[case]
    if any(o.startswith("eval.dataset=") for o in overrides):
        overrides.append(f"eval.data_dir={tfds_dir}")
    config = _config(repo_root, experiment, f"data.data_dir={shapes_data_dir}", *overrides)
    data = get_family(config).make_data(config, for_eval=True)
    assert data.eval_keys() == set(data.eval_split())


def test_retrieval_on_classification_stops_before_step0_without_decoding(
        repo_root, shapes_data_dir, tfds_dir, tmp_path):
    name = EvalCheckCorruptImages.name
    with pytest.raises(Exception) as decoded:  # The reference: reading the images fails.
        eval_data.load_tfds_classification(name, split="test", data_dir=tfds_dir, image_size=32)
    assert not isinstance(decoded.value, config_lib.ConfigError)

    workdir = tmp_path / "run"
    config = _config(repo_root, "clip_tiny.py", f"data.data_dir={shapes_data_dir}",
                     f"eval.dataset=tfds:{name}", f"eval.data_dir={tfds_dir}",
                     "eval.evaluators=['zeroshot', 'retrieval']")
    with pytest.raises(config_lib.ConfigError) as info:
        train.train_and_evaluate(config, str(workdir))
    message = str(info.value)
    assert f"tfds:{name}/test" in message and "'retrieval' needs images with captions" in message
    assert "no ['text']" in message and "these evaluators run: ['zeroshot']" in message
    assert not (workdir / "metrics.jsonl").exists()
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_default_evaluators_on_imagenet_name_retrieval(repo_root, shapes_data_dir, tfds_dir):
    """The run's default evaluators (zeroshot, retrieval) on ImageNet: retrieval needs captions."""
    config = _config(repo_root, "clip_tiny.py", f"data.data_dir={shapes_data_dir}",
                     "eval.dataset=tfds:imagenet2012", f"eval.data_dir={tfds_dir}",
                     "eval.split=validation")
    assert list(config.eval.evaluators) == ["zeroshot", "retrieval"]
    with pytest.raises(config_lib.ConfigError) as info:
        train.check_eval_data(config, get_family(config).make_data(config, for_eval=True))
    message = str(info.value)
    assert "tfds:imagenet2012/validation" in message and "'retrieval' needs" in message
    assert "'zeroshot' needs" not in message and "run: ['zeroshot']" in message


def test_missing_tfds_dataset_or_split_is_reported_from_metadata(repo_root, shapes_data_dir,
                                                                  tfds_dir, tmp_path):
    config = _config(repo_root, "clip_tiny.py", f"data.data_dir={shapes_data_dir}",
                     "eval.dataset=tfds:cifar100", f"eval.data_dir={tmp_path}")
    with pytest.raises(DataError, match="'cifar100' is not prepared"):
        get_family(config).make_data(config, for_eval=True).eval_keys()
    config = _config(repo_root, "flamingo_tiny_shapes.py", f"data.data_dir={shapes_data_dir}",
                     "eval.dataset=tfds:coco_captions", f"eval.data_dir={tfds_dir}")
    with pytest.raises(DataError, match="no split 'train'"):  # the in-context pool's split
        get_family(config).make_data(config, for_eval=True).eval_keys()


@pytest.mark.e2e
def test_train_command_stops_before_step0(repo_root, shapes_data_dir, tmp_path):
    """`vlm-jax train --config experiments/clip_tiny.py:test
    --config.eval.evaluators="['fewshot_vqa']"` used to train every step and fail at the first
    evaluation."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "train", "--config",
         str(repo_root / "experiments/clip_tiny.py") + ":test",
         "--config.eval.evaluators=['fewshot_vqa']", f"--config.data.data_dir={shapes_data_dir}",
         "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=repo_root, timeout=300,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Model clip" not in proc.stdout  # printed once training is set up
    assert not (workdir / "metrics.jsonl").exists()  # no train step was logged
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    err = proc.stderr
    assert "ConfigError" in err and "'fewshot_vqa' needs" in err and "shapes/test" in err
    assert "a Flamingo model: experiments/flamingo_tiny_shapes.py" in err
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
                          "--evaluators", "fewshot_vqa"]) == 2
    err = capsys.readouterr().err
    assert "vlm-jax eval: ConfigError" in err and "'fewshot_vqa' needs" in err
