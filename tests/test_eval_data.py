"""Tests of input_pipeline/eval_data.py on small TFDS datasets built here in ArrayRecord format.

The builders below write real TFDS datasets (``tfds.features.Image`` holding PNG bytes, which
needs no tensorflow) that are read back through ``tfds.data_source`` as real ones are. Expected
pixels are computed here with PIL and numpy from the original arrays, not with the transforms
of input_pipeline.
"""

import io
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder
from tensorflow_datasets.image_classification import cifar

from input_pipeline import DataError, eval_data
from vlm_jax.evaluators import metadata
from vlm_jax.models.layers import normalize_pixels

SIZE = 12
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])

CLS_NAMES = ["red square", "green_circle", "blue triangle"]
CLS_LABELS = [2, 0, 1, 1, 0]
# (height, width, channels): landscape, portrait, already SIZE x SIZE, greyscale, upscaled.
CLS_SHAPES = [(24, 36, 3), (36, 18, 3), (SIZE, SIZE, 3), (30, 20, 1), (7, 9, 3)]
CAPTIONS = [["a cat.", "a cat on a mat."],
            ["one", "two", "three", "four", "five"],
            ["a single caption."],
            []]  # no caption: left out of the retrieval set


def _images(shapes, seed):
    rng = np.random.default_rng(seed)
    out = []
    for h, w, c in shapes:
        image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        out.append(image[..., 0] if c == 1 else image)
    return out


CLS_IMAGES = _images(CLS_SHAPES, seed=0)
CAP_IMAGES = _images([(16, 20, 3), (20, 16, 3), (SIZE, SIZE, 3), (14, 14, 3)], seed=1)


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")  # lossless: decoded pixels are these
    return out.getvalue()


def _norm(pixels: np.ndarray) -> np.ndarray:
    """The loaders keep uint8; the model normalises on the device: that normalisation."""
    return np.asarray(normalize_pixels(jnp.asarray(pixels)))


def _expected(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Reference eval preprocessing, torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop``
    (open_clip's eval transform) written out: the short side becomes ``size`` and the long side
    ``int(size * long / short)`` (``_compute_resized_output_size``); the crop starts at
    ``int(round((side - size) / 2.0))`` (``center_crop``); then (x / 255 - mean) / std with
    OpenAI CLIP's statistics."""
    pil = Image.fromarray(image).convert("RGB")
    w, h = pil.size
    if (h, w) != (size, size):
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    pixels = np.asarray(pil, np.float64)
    top = int(round((pixels.shape[0] - size) / 2.0))
    left = int(round((pixels.shape[1] - size) / 2.0))
    crop = pixels[top:top + size, left:left + size]
    return (crop / 255 - CLIP_MEAN) / CLIP_STD


class EvalDataTestClassification(tfds.core.GeneratorBasedBuilder):
    """Images of several sizes (one greyscale) with a 3-class label."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download (and no checksum-file lookup)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=CLS_NAMES),
                "score": tfds.features.Scalar(np.float32),
            }),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i, (image, label) in enumerate(zip(CLS_IMAGES, CLS_LABELS)):
            yield i, {"image": _png(image), "label": label, "score": 0.5}


class _FakeCocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Written where TFDS' ``coco_captions`` (config ``2014``) lives, with its caption layout: an
    image and a sequence of captions (``captions/text``). TFDS' own builder cannot write without
    tensorflow (its features use tf dtypes); reading must work without it."""

    name = "coco_captions"
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"),
                "image/id": np.int64,
                "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
            }),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i, (image, texts) in enumerate(zip(CAP_IMAGES, CAPTIONS)):
            yield i, {"image": _png(image), "image/id": i,
                      "captions": {"text": texts, "id": list(range(len(texts)))}}


class _FakeCifar10(cifar.Cifar10, skip_registration=True):
    """TFDS' own cifar10 builder (features, version) with 4 generated test images, so that
    ``tfds.data_source('cifar10')`` reads it as the real dataset."""

    name = "cifar10"
    url_infos = None

    def _split_generators(self, dl_manager):
        self.info.features["label"].names = ["airplane", "automobile", "bird", "cat", "deer",
                                             "dog", "frog", "horse", "ship", "truck"]
        return {"test": self._fake_examples()}

    def _fake_examples(self):
        for i, image in enumerate(_images([(32, 32, 3)] * 4, seed=2)):
            yield i, {"id": f"test_{i}", "image": _png(image), "label": 9 - i}


class _FakeImagenet2012(imagenet2012_dataset_builder.Builder, skip_registration=True):
    """TFDS' imagenet2012 builder with 3 generated validation images."""

    name = "imagenet2012"
    url_infos = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = None

    def _split_generators(self, dl_manager):
        return {"validation": self._fake_examples()}

    def _fake_examples(self):
        for i, image in enumerate(_images([(40, 30, 3)] * 3, seed=3)):
            yield f"img{i}", {"image": _png(image), "label": 999 - i, "file_name": f"img{i}"}


def _prepare(builder_cls, data_dir):
    tfds.display_progress_bar(False)
    builder_cls(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return str(data_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tfds")
    for builder_cls in (EvalDataTestClassification, _FakeCocoCaptions, _FakeCifar10,
                        _FakeImagenet2012):
        _prepare(builder_cls, root)
    return str(root)


# --- classification ----------------------------------------------------------------------------

def test_classification_shapes_labels_and_names(data_dir):
    name = EvalDataTestClassification.name
    assert name == "eval_data_test_classification"
    data = eval_data.load_tfds_classification(name, split="test", data_dir=data_dir,
                                              image_size=SIZE)
    assert set(data) == {"image", "label", "class_names", "templates"}
    assert data["image"].dtype == np.uint8 and data["image"].shape == (5, SIZE, SIZE, 3)
    assert data["label"].dtype == np.int32 and data["label"].tolist() == CLS_LABELS
    # Not a dataset with curated metadata: the TFDS label names, "_" read as a space.
    assert data["class_names"] == ["red square", "green circle", "blue triangle"]
    assert data["templates"] == ("a photo of a {}.",)


def test_classification_pixels_match_reference(data_dir):
    data = eval_data.load_tfds_classification(EvalDataTestClassification.name, split="test",
                                              data_dir=data_dir, image_size=SIZE,
                                              num_threads=3)
    for got, image in zip(data["image"], CLS_IMAGES):
        np.testing.assert_allclose(_norm(got), _expected(image), atol=1e-5)
    # The SIZE x SIZE image is only normalised: check one pixel by hand.
    r, g, b = CLS_IMAGES[2][5, 7]
    np.testing.assert_allclose(_norm(data["image"][2])[5, 7],
                               [(r / 255 - 0.48145466) / 0.26862954,
                                (g / 255 - 0.4578275) / 0.26130258,
                                (b / 255 - 0.40821073) / 0.27577711], atol=1e-5)
    # The greyscale image became RGB with three equal channels before normalisation.
    grey = data["image"][3]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])


def test_classification_max_examples(data_dir):
    name = EvalDataTestClassification.name
    data = eval_data.load_tfds_classification(name, split="test", data_dir=data_dir,
                                              image_size=SIZE, max_examples=2)
    assert data["image"].shape == (2, SIZE, SIZE, 3)
    assert data["label"].tolist() == CLS_LABELS[:2]
    np.testing.assert_allclose(_norm(data["image"][1]), _expected(CLS_IMAGES[1]), atol=1e-5)
    assert len(eval_data.load_tfds_classification(
        name, split="test", data_dir=data_dir, image_size=SIZE, max_examples=99)["label"]) == 5
    sliced = eval_data.load_tfds_classification(name, split="test[3:]", data_dir=data_dir,
                                                image_size=SIZE)
    assert sliced["label"].tolist() == CLS_LABELS[3:]
    with pytest.raises(DataError, match="max_examples=0"):
        eval_data.load_tfds_classification(name, split="test", data_dir=data_dir,
                                           image_size=SIZE, max_examples=0)


@pytest.mark.parametrize("tfds_name, meta_name, split, labels", [
    ("cifar10", "cifar10", "test", [9, 8, 7, 6]),
    ("imagenet2012", "imagenet1k", "validation", [999, 998, 997]),
])
def test_known_datasets_use_curated_metadata(data_dir, tfds_name, meta_name, split, labels):
    data = eval_data.load_tfds_classification(tfds_name, split=split, data_dir=data_dir,
                                              image_size=SIZE)
    # TFDS' builders shuffle records on writing: compare the label multiset.
    assert sorted(data["label"].tolist()) == sorted(labels)
    assert data["image"].shape == (len(labels), SIZE, SIZE, 3)
    assert data["class_names"] == metadata.class_names(meta_name)
    assert data["templates"] == metadata.templates(meta_name)
    if meta_name == "imagenet1k":
        assert len(data["templates"]) == 80 and data["class_names"][999] == "toilet paper"
    else:
        assert len(data["templates"]) == 18 and data["class_names"][9] == "truck"


# --- retrieval ---------------------------------------------------------------------------------

class _LengthTokenizer:
    """Stand-in tokenizer: row = [number of characters, number of words, 0, ...]."""

    def encode(self, texts):
        out = np.zeros((len(texts), 5), np.int32)
        for row, text in zip(out, texts):
            row[:2] = len(text), len(text.split())
        return out


def test_retrieval_flattens_captions(data_dir):
    # The default name, "coco_captions", resolves to its default config "2014".
    data = eval_data.load_tfds_retrieval(split="test", data_dir=data_dir, image_size=SIZE,
                                         max_examples=3)
    assert set(data) == {"image", "caption", "text_to_image"}
    assert data["image"].dtype == np.uint8 and data["image"].shape == (3, SIZE, SIZE, 3)
    assert data["caption"] == CAPTIONS[0] + CAPTIONS[1] + CAPTIONS[2]
    assert data["text_to_image"].dtype == np.int32
    assert data["text_to_image"].tolist() == [0, 0, 1, 1, 1, 1, 1, 2]
    for got, image in zip(data["image"], CAP_IMAGES):
        np.testing.assert_allclose(_norm(got), _expected(image), atol=1e-5)


def test_retrieval_max_examples_tokenizer_and_captionless_image(data_dir):
    name = "coco_captions/2014"
    two = eval_data.load_tfds_retrieval(name, split="test", data_dir=data_dir, image_size=SIZE,
                                        max_examples=2, tokenizer=_LengthTokenizer())
    assert two["image"].shape == (2, SIZE, SIZE, 3)
    assert two["text_to_image"].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert two["text"].dtype == np.int32 and two["text"].shape == (7, 5)
    assert two["text"][:, :2].tolist() == [[len(c), len(c.split())]
                                           for c in CAPTIONS[0] + CAPTIONS[1]]
    # All 4 images: the 4th has no caption and is left out.
    every = eval_data.load_tfds_retrieval(name, split="test", data_dir=data_dir,
                                          image_size=SIZE)
    assert every["image"].shape == (3, SIZE, SIZE, 3)
    assert every["text_to_image"].tolist() == [0, 0, 1, 1, 1, 1, 1, 2]
    with pytest.raises(DataError, match="captions/nope"):
        eval_data.load_tfds_retrieval(name, split="test", data_dir=data_dir, image_size=SIZE,
                                      caption_key="captions/nope")


# --- errors ------------------------------------------------------------------------------------

def test_not_prepared_names_dataset_directory_and_command(tmp_path):
    empty = str(tmp_path / "tfds")
    with pytest.raises(DataError) as info:
        eval_data.load_tfds_classification("cifar10", split="test", data_dir=empty,
                                           image_size=SIZE)
    message = str(info.value)
    assert "'cifar10'" in message and empty in message
    assert f"tfds build cifar10 --data_dir {empty} --file_format=array_record" in message
    assert not os.path.exists(os.path.join(empty, "downloads"))  # nothing was fetched

    with pytest.raises(DataError) as info:
        eval_data.load_tfds_classification("imagenet2012", split="validation", data_dir=empty,
                                           image_size=SIZE)
    message = str(info.value)
    assert "manual download" in message and "ILSVRC2012_img_val.tar" in message
    assert os.path.join(empty, "downloads", "manual") in message
    assert f"tfds build imagenet2012 --data_dir {empty}" in message

    with pytest.raises(DataError, match="coco_captions"):
        eval_data.load_tfds_retrieval("coco_captions", split="test", data_dir=empty,
                                      image_size=SIZE)


def test_other_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="No TFDS dataset 'no_such_dataset_xyz'"):
        eval_data.load_tfds_classification("no_such_dataset_xyz", split="test",
                                           data_dir=str(tmp_path), image_size=SIZE)
    name = EvalDataTestClassification.name
    with pytest.raises(DataError, match=r"found there: \['eval_data_test_classification:1.0.0'\]"):
        eval_data.load_tfds_classification(f"{name}:2.0.0", split="test", data_dir=data_dir,
                                           image_size=SIZE)
    with pytest.raises(DataError, match=r"no split 'train'; it has \['test'\]"):
        eval_data.load_tfds_classification(name, split="train", data_dir=data_dir,
                                           image_size=SIZE)
    with pytest.raises(DataError, match="no feature 'fine_label'"):
        eval_data.load_tfds_classification(name, split="test", data_dir=data_dir,
                                           image_size=SIZE, label_key="fine_label")
    with pytest.raises(DataError, match="'score' .* is a Scalar without class names"):
        eval_data.load_tfds_classification(name, split="test", data_dir=data_dir,
                                           image_size=SIZE, label_key="score")


def test_shapes_matches_load_eval_split(tmp_path):
    """The project's own dataset read here equals pipeline.load_eval_split's eval arrays."""
    from input_pipeline import pipeline, shapes  # pylint: disable=import-outside-toplevel

    shapes.prepare(tmp_path, config="32px", num_train=16, num_eval=8, process_index=0,
                   progress=False)
    data = eval_data.load_tfds_classification("shapes/32px", split="test", data_dir=tmp_path,
                                              image_size=24)
    ref = pipeline.load_eval_split(data_dir=tmp_path, config_name="32px", split="test",
                                   context_length=16, image_size=24)
    np.testing.assert_array_equal(data["image"], ref["image"])  # uint8 pixels, both
    np.testing.assert_array_equal(data["label"], ref["label"])
    assert data["class_names"] == ref["class_names"] and data["templates"] == ref["templates"]


# --- Flamingo few-shot captioning on a TFDS captions dataset ------------------------------------

def test_flamingo_fewshot_captioning_reads_tfds_captions(data_dir, repo_root, shapes_data_dir):
    import jax

    from vlm_jax import config as config_lib
    from vlm_jax.families import get_family
    from vlm_jax import parallel, train
    from vlm_jax.evaluators import fewshot
    from vlm_jax.evaluators.common import FeatureExtractor

    config = config_lib.load_config(
        f"{repo_root / 'experiments/flamingo_tiny_shapes.py'}:test",
        [f"data.data_dir={shapes_data_dir}", f"eval.data_dir={data_dir}",
         "evals.fewshot_captioning.dataset=tfds:coco_captions",
         "evals.fewshot_captioning.max_examples=0",
         "evals.fewshot_captioning.options.fewshot_pool_split=test",
         "evals.fewshot_captioning.options.fewshot_pool=2"])
    d = get_family(config).make_data(config, for_eval=True)
    evaluation = train.make_evaluation(config, d, ["fewshot_captioning"])
    ev = evaluation.load(evaluation.entries[0])
    size = config.model.vision.image_size
    assert ev["image"].dtype == np.uint8 and ev["image"].shape == (3, size, size, 3)
    assert ev["captions"] == CAPTIONS[:3]
    assert ev["pool"]["caption"] == [CAPTIONS[0][0], CAPTIONS[1][0]]
    s = train.setup(config, parallel.create_mesh({}, devices=jax.devices()[:1]))
    params = s.init_fn()["params"]
    ex = FeatureExtractor(s.graphdef, params, s.param_shardings, s.mesh, s.rules, 4,
                          tokenizer=d.tokenizer)
    out = fewshot.evaluate_captioning(ex, d.tokenizer, ev, shots=(0, 2), max_new_tokens=4)
    assert set(out) == {"cider_0shot", "bleu4_0shot", "cider_2shot", "bleu4_2shot"}
    assert all(np.isfinite(v) for v in out.values())
    bad = config_lib.load_config(
        f"{repo_root / 'experiments/flamingo_tiny_shapes.py'}:test",
        [f"data.data_dir={shapes_data_dir}", "evals.fewshot_captioning.dataset=tfds:cifar10"])
    with pytest.raises(config_lib.ConfigError, match="config.evals.fewshot_captioning.*captions"):
        train.check_eval_data(bad, get_family(bad).make_data(bad, for_eval=True))
