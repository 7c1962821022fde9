"""Tests of shapes 1.2.0's localisation features (boxes, referring expressions, grounded
captions) and of the referring-expression evaluator.

References: the shapes code of 1.1.0 (read from git history) for "nothing else changed", the
drawn pixels for the boxes, an independent parser of the expressions for their meaning, and
numpy IoUs written here for the evaluator.
"""

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage

from input_pipeline import pipeline, shapes
from input_pipeline.shapes import generator
from vlm_jax.evaluators import EVALUATORS, localisation

# The last commit of shapes 1.1.0 (the generator and builder before the localisation features).
V110_COMMIT = "11c685654575b3275a9fc09ee21209f47f536a98"
SPLITS = ["train", "validation", "test", "test_heldout"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
# "the [small|large] [colour] <shape> [in the top left | at the top | on the left | ...]"
REFEXP = re.compile(r"^the (?:(small|large) )?(?:(%s) )?(%s)(?: (?:in|at|on) the "
                    r"(top left|top right|bottom left|bottom right|top|bottom|left|right|"
                    r"centre))?$" % ("|".join(COLOURS), "|".join(SHAPES)))


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def v110(repo_root, tmp_path_factory):
    """The generator and builder modules of shapes 1.1.0, from git history."""
    sources = {}
    for name in ("generator", "builder"):
        try:
            sources[name] = subprocess.run(
                ["git", "-C", str(repo_root), "show",
                 f"{V110_COMMIT}:input_pipeline/shapes/{name}.py"],
                check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"shapes 1.1.0 is not in this checkout's git history: {e}")
    d = tmp_path_factory.mktemp("shapes_v110")
    (d / "v110_generator.py").write_text(sources["generator"])
    old_import = "from input_pipeline.shapes import generator\n"
    assert old_import in sources["builder"]
    (d / "v110_builder.py").write_text(
        sources["builder"].replace(old_import, "import v110_generator as generator\n"))
    sys.path.insert(0, str(d))
    try:
        gen = _load_module("v110_generator", d / "v110_generator.py")
        with tfds.core.registered.skip_registration():  # "shapes" is the registered 1.2.0
            bld = _load_module("v110_builder", d / "v110_builder.py")
    finally:
        sys.path.remove(str(d))
    assert str(bld.Shapes.VERSION) == "1.1.0"
    return gen, bld


def test_examples_are_those_of_version_1_1_0(v110):
    old_gen, _ = v110
    for split in SPLITS:
        seed = shapes.SPLIT_SEEDS[split]
        for i in range(300):
            new, old = shapes.render_example(seed, i), old_gen.render_example(seed, i)
            assert new.keys() == old.keys()
            assert new["image"].tobytes() == old["image"].tobytes(), (split, i)
            for key in ("caption", "label", "question", "answer"):
                assert new[key] == old[key], (split, i, key)


def test_records_and_training_stream_are_those_of_version_1_1_0(v110, shapes_data_dir,
                                                                tmp_path):
    """The clip_tiny:test dataset (shapes/32px, 512 / 128 records) built by the 1.1.0 builder
    and by this one: same records, same tokenizer, same tokenised training batches."""
    _, old_builder = v110
    old_dir = old_builder.prepare(tmp_path, config="32px", num_train=512, num_eval=128,
                                  process_index=0, progress=False)
    new_dir = shapes.dataset_dir(shapes_data_dir, "32px")
    assert old_dir.name == "1.1.0" and new_dir.name == "1.2.0"
    assert ((old_dir / shapes.TOKENIZER_FILENAME).read_bytes()
            == (new_dir / shapes.TOKENIZER_FILENAME).read_bytes())
    for split in SPLITS:
        old = tfds.builder_from_directory(old_dir).as_data_source(split)
        new = tfds.builder_from_directory(new_dir).as_data_source(split)
        assert len(old) == len(new) == (512 if split == "train" else 128)
        for i in range(len(old)):
            o, n = old[i], new[i]
            assert set(o) < set(n)
            for key in o:
                assert np.array_equal(o[key], n[key]), (split, i, key)
    from experiments import clip_tiny  # pylint: disable=import-outside-toplevel

    c = clip_tiny.get_config("test")
    kw = dict(dataset="shapes", config_name="32px", split="train",
              global_batch_size=c.batch_size, seed=c.seed,
              context_length=c.model.text.context_length, process_index=0, process_count=1,
              image_size=c.model.image.image_size)
    old_it = pipeline.create_train_iterator(data_dir=tmp_path, **kw)
    new_it = pipeline.create_train_iterator(data_dir=shapes_data_dir, **kw)
    for _ in range(40):  # 640 examples: past the first epoch of 512
        o, n = next(old_it), next(new_it)
        assert set(o) == set(n) == {"image", "text", "label"}
        for key in o:
            np.testing.assert_array_equal(o[key], n[key])


def _components(image, background):
    """Labelled connected components of the non-background pixels (one per object: objects
    are drawn apart)."""
    return ndimage.label(np.any(image != np.asarray(background), axis=-1))[0]


def _iou(a, b):
    """IoU of two boxes (ymin, xmin, ymax, xmax)."""
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(np.subtract(a[2:], a[:2])) + np.prod(np.subtract(b[2:], b[:2])) - inter
    return float(inter / union)


def test_boxes_bound_the_drawn_shapes():
    # At 64 px: every pixel of exactly the object's colour (fully covered) lies in the box, and
    # the box lies in the bounding box of the object's pixels (partially covered ones too),
    # within half a pixel (the drawing's sub-pixel rounding).
    for split in SPLITS:
        seed = shapes.SPLIT_SEEDS[split]
        for i in range(100):
            scene = generator.sample_scene(seed, i)
            image = generator.draw_scene(scene, 64)
            boxes = generator.scene_locations(scene, seed, i)["objects"]["bbox"]
            labels = _components(image, scene.background[2])
            assert boxes.shape == (len(scene.objects), 4)
            for obj, box in zip(scene.objects, boxes * 64):
                exact = np.all(image == generator.COLORS[obj.color], axis=-1)
                ys, xs = np.nonzero(exact)
                assert ys.min() >= box[0] - 0.5 and xs.min() >= box[1] - 0.5
                assert ys.max() + 1 <= box[2] + 0.5 and xs.max() + 1 <= box[3] + 0.5
                (component,) = np.unique(labels[exact])
                my, mx = np.nonzero(labels == component)
                assert box[0] >= my.min() - 0.5 and box[1] >= mx.min() - 0.5
                assert box[2] <= my.max() + 1.5 and box[3] <= mx.max() + 1.5
    # At 256 px the pixel grid is fine enough for the IoU with the mask's box to be ~1.
    ious = []
    for i in range(40):
        scene = generator.sample_scene(shapes.SPLIT_SEEDS["test"], i)
        image = generator.draw_scene(scene, 256)
        boxes = generator.scene_locations(scene, shapes.SPLIT_SEEDS["test"], i)["objects"]["bbox"]
        labels = _components(image, scene.background[2])
        for obj, box in zip(scene.objects, boxes):
            (component,) = np.unique(labels[np.all(image == generator.COLORS[obj.color], -1)])
            my, mx = np.nonzero(labels == component)
            mask_box = np.array([my.min(), mx.min(), my.max() + 1, mx.max() + 1]) / 256
            ious.append(_iou(box, mask_box))
    assert min(ious) > 0.9, min(ious)


def _region(cx, cy):
    """The 3 x 3 grid cell of a point, in the expressions' words."""
    row = ["top", "", "bottom"][min(int(cy * 3), 2)]
    col = ["left", "", "right"][min(int(cx * 3), 2)]
    return f"{row} {col}".strip() or "centre"


def _matches(words, obj):
    size, colour, shape, region = words
    return (shape == obj.shape and size in (None, obj.size) and colour in (None, obj.color)
            and region in (None, _region(obj.cx, obj.cy)))


def test_referring_expressions_name_exactly_one_object_with_no_word_to_spare():
    seen = {"size": 0, "colour": 0, "region": 0}
    for split in SPLITS:
        seed = shapes.SPLIT_SEEDS[split]
        for i in range(300):
            scene = generator.sample_scene(seed, i)
            loc = generator.scene_locations(scene, seed, i)
            objects = loc["objects"]
            assert len(objects["refexp"]) == len(objects["caption"]) == len(scene.objects)
            assert list(objects["label"]) == [
                COLOURS.index(o.color) * 5 + SHAPES.index(o.shape) for o in scene.objects]
            for k, expression in enumerate(objects["refexp"]):
                match = REFEXP.match(expression)
                assert match, expression
                words = match.groups()
                hits = [j for j, o in enumerate(scene.objects) if _matches(words, o)]
                assert hits == [k], (split, i, expression, hits)
                for a, name in enumerate(("size", "colour", None, "region")):
                    if name and words[a] is not None:  # without this word it is ambiguous
                        seen[name] += 1
                        fewer = words[:a] + (None,) + words[a + 1:]
                        assert sum(_matches(fewer, o) for o in scene.objects) > 1, expression
                obj = scene.objects[k]
                assert objects["caption"][k].startswith(
                    f"{'an' if obj.size[0] in 'aeiou' else 'a'} {obj.size} {obj.color} "
                    f"{obj.shape} ")
            assert loc["refexp"] == objects["refexp"][loc["refexp_object"]]
            np.testing.assert_array_equal(loc["refexp_bbox"],
                                          objects["bbox"][loc["refexp_object"]])
    assert seen["colour"] > 10 and seen["region"] > 10, seen  # both occur when needed


def test_stored_records_carry_the_localisation_features(shapes_data_dir):
    ev = pipeline.load_eval_split(data_dir=shapes_data_dir, config_name="32px", split="test",
                                  context_length=8, max_examples=20)
    assert ev["refexp_bbox"].shape == (20, 4) and ev["refexp_bbox"].dtype == np.float32
    seed = shapes.SPLIT_SEEDS["test"]
    for i in range(20):
        loc = generator.scene_locations(generator.sample_scene(seed, i), seed, i)
        assert ev["refexp"][i] == loc["refexp"]
        np.testing.assert_array_equal(ev["refexp_bbox"][i], loc["refexp_bbox"])
    builder = pipeline.split_builder(shapes_data_dir, "shapes", "32px", ["test"])
    assert {"refexp", "refexp_bbox"} <= pipeline.eval_split_keys(builder)
    record = builder.as_data_source("test")[0]
    loc = generator.scene_locations(generator.sample_scene(seed, 0), seed, 0)
    np.testing.assert_array_equal(np.stack(record["objects"]["bbox"]), loc["objects"]["bbox"])
    assert [s.decode() for s in record["objects"]["refexp"]] == loc["objects"]["refexp"]


# -- the evaluator ---------------------------------------------------------------------------


def test_box_iou_matches_hand_computed_values():
    a = np.array([[0.0, 0.0, 1.0, 1.0],    # the same box: 1
                  [0.0, 0.0, 1.0, 1.0],    # half of it: 0.5 / 1
                  [0.0, 0.0, 0.5, 0.5],    # disjoint: 0
                  [0.0, 0.0, 0.5, 0.5],    # touching edges: 0
                  [0.0, 0.0, 0.4, 0.4],    # corners overlap 0.2 x 0.2 = 0.04; union 0.28
                  [0.2, 0.2, 0.2, 0.6],    # zero area: 0
                  [0.1, 0.1, 0.3, 0.3]])   # inside a 4x larger box: 0.04 / 0.16
    b = np.array([[0.0, 0.0, 1.0, 1.0],
                  [0.0, 0.0, 0.5, 1.0],
                  [0.6, 0.6, 1.0, 1.0],
                  [0.5, 0.0, 1.0, 0.5],
                  [0.2, 0.2, 0.6, 0.6],
                  [0.2, 0.2, 0.2, 0.6],
                  [0.0, 0.0, 0.4, 0.4]])
    expected = [1.0, 0.5, 0.0, 0.0, 0.04 / 0.28, 0.0, 0.25]
    np.testing.assert_allclose(localisation.box_iou(a, b), expected, atol=1e-12)


class OraclePredictor:
    """Non-learned box predictor: looks each expression up among the scene's objects (the
    records' per-object expressions and boxes); ``shift``: moves every box right by that
    fraction of its width."""

    def __init__(self, objects_per_image, shift=0.0):
        self.objects, self.shift = objects_per_image, shift

    def locate(self, images, expressions):
        out = []
        for image_objects, expression in zip(self.objects, expressions):
            k = image_objects["refexp"].index(expression)
            box = np.array(image_objects["bbox"][k], np.float64)
            box[[1, 3]] += self.shift * (box[3] - box[1])
            out.append(box)
        assert len(images) == len(out)
        return np.stack(out)


class FixedBoxPredictor:
    """Predicts the same box for every image."""

    def __init__(self, box):
        self.box = np.asarray(box, np.float64)

    def locate(self, images, expressions):
        return np.tile(self.box, (len(images), 1))


@pytest.fixture(scope="module")
def refexp_data(shapes_data_dir):
    ev = pipeline.load_eval_split(data_dir=shapes_data_dir, config_name="32px", split="test",
                                  context_length=8)
    seed = shapes.SPLIT_SEEDS["test"]
    objects = [generator.scene_locations(generator.sample_scene(seed, i), seed, i)["objects"]
               for i in range(len(ev["image"]))]
    return ev, objects


def test_refexp_accuracy_of_reference_predictors(refexp_data):
    data, objects = refexp_data
    evaluate = EVALUATORS["refexp"]
    assert evaluate(OraclePredictor(objects), None, data)["acc@0.5"] == 1.0
    # A box moved right by a fraction f of its width keeps IoU (1 - f) / (1 + f):
    # 0.538 for f = 0.3 (a hit), 0.481 for f = 0.35 (a miss).
    near = evaluate(OraclePredictor(objects, shift=0.3), None, data)
    assert near["acc@0.5"] == 1.0 and near["mean_iou"] == pytest.approx(0.7 / 1.3, abs=1e-5)
    assert evaluate(OraclePredictor(objects, shift=0.35), None, data)["acc@0.5"] == 0.0
    # The fixed centre box: the accuracy numpy IoUs of the true boxes say.
    centre = [0.25, 0.25, 0.75, 0.75]
    ious = np.array([_iou(np.asarray(centre), b) for b in data["refexp_bbox"]])
    expected = float(np.mean(ious >= 0.5))
    assert 0.05 < expected < 0.95  # the main object often, small distractors never
    out = evaluate(FixedBoxPredictor(centre), None, data)
    assert out["acc@0.5"] == pytest.approx(expected)
    assert out["mean_iou"] == pytest.approx(float(ious.mean()))
    assert evaluate(FixedBoxPredictor(centre), None, data, iou_threshold=0.3)["acc@0.3"] == \
        pytest.approx(float(np.mean(ious >= 0.3)))


def test_refexp_refuses_predictions_of_the_wrong_shape(refexp_data):
    data, _ = refexp_data

    class Wrong:
        def locate(self, images, expressions):
            return np.zeros((len(images), 3))

    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        EVALUATORS["refexp"](Wrong(), None, data)
    with pytest.raises(ValueError, match="locate"):
        EVALUATORS["refexp"](object(), None, data)


def test_refexp_entry_loads_what_its_metadata_promises_and_needs_a_locate_model(
        repo_root, shapes_data_dir):
    from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax import train  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

    entry = dict(type="refexp", dataset="shapes", split="test", every_steps=0, max_examples=8,
                 options=dict(iou_threshold=0.5))
    config = config_lib.load_config(f"{repo_root / 'experiments' / 'clip_tiny.py'}:test",
                                    [f"data.data_dir={shapes_data_dir}",
                                     f"evals={ {'loc': entry}!r}"])
    data = get_family(config).make_data(config, for_eval=True)
    evaluation = train.make_evaluation(config, data)
    (e,) = evaluation.entries
    loaded = evaluation.load(e)
    assert evaluation.keys(e) == set(loaded)
    assert loaded["refexp_bbox"].shape == (8, 4) and len(loaded["refexp"]) == 8
    with pytest.raises(config_lib.ConfigError) as info:  # CLIP predicts no boxes
        train.check_eval_data(config, data)
    message = str(info.value)
    assert "config.evals.loc (type 'refexp') on shapes/test" in message
    assert "without 'locate'" in message, message
