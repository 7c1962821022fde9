"""Tests of the shapes generator and its TFDS builder (input_pipeline/shapes)."""

import contextlib
import hashlib
import io
import re
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from input_pipeline import DataError, shapes
from input_pipeline.shapes import generator
from input_pipeline.tokenizers import SentencePieceTokenizer
from tests.data_fixtures import TINY_NUM_EVAL, TINY_NUM_TRAIN, tiny_data_dir  # noqa: F401

# The specification, written independently of the generator's tables.
EXPECTED_COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
EXPECTED_SHAPES = ["circle", "square", "triangle", "star", "cross"]
NUMBERS = {"one": 1, "two": 2, "three": 3}
SPLITS = ["train", "validation", "test", "test_heldout"]


def _object_pixel_counts(image: np.ndarray) -> dict[str, int]:
    """Pixels exactly of each object colour (anti-aliased edges are blends, not counted)."""
    return {name: int(np.all(image == rgb, axis=-1).sum())
            for name, rgb in generator.COLORS.items()}


def _first(words: list[str], vocabulary: list[str]) -> str:
    return next(w for w in words if w in vocabulary)


def test_class_names_are_the_30_colour_shape_pairs():
    assert shapes.CLASS_NAMES == [f"{c} {s}" for c in EXPECTED_COLORS for s in EXPECTED_SHAPES]
    assert shapes.NUM_CLASSES == 30
    for template in shapes.ZERO_SHOT_TEMPLATES:
        assert template.count("{}") == 1


def test_split_seeds_are_distinct():
    assert sorted(shapes.SPLIT_SEEDS) == sorted(SPLITS)
    assert len(set(shapes.SPLIT_SEEDS.values())) == 4


def test_render_is_deterministic():
    for index in (0, 7, 12345):
        a = shapes.render_example(shapes.SPLIT_SEEDS["train"], index)
        b = shapes.render_example(shapes.SPLIT_SEEDS["train"], index)
        assert a["image"].dtype == np.uint8 and a["image"].shape == (64, 64, 3)
        assert a["image"].tobytes() == b["image"].tobytes()
        assert {k: v for k, v in a.items() if k != "image"} == \
            {k: v for k, v in b.items() if k != "image"}
    small = shapes.render_example(shapes.SPLIT_SEEDS["train"], 0, image_size=32)
    assert small["image"].shape == (32, 32, 3)
    assert small["caption"] == shapes.render_example(shapes.SPLIT_SEEDS["train"], 0)["caption"]


def test_splits_have_different_images():
    hashes = {split: {hashlib.sha1(shapes.render_example(seed, i)["image"]).hexdigest()
                      for i in range(100)}
              for split, seed in shapes.SPLIT_SEEDS.items()}
    for split in SPLITS:
        assert len(hashes[split]) == 100, f"duplicate images within {split}"
        for other in SPLITS:
            if other != split:
                assert not hashes[split] & hashes[other], (split, other)


def test_label_is_the_first_colour_and_shape_named_by_the_caption():
    for split in SPLITS:
        for i in range(300):
            ex = shapes.render_example(shapes.SPLIT_SEEDS[split], i, image_size=32)
            words = re.findall(r"[a-z]+", ex["caption"])
            colour, shape = _first(words, EXPECTED_COLORS), _first(words, EXPECTED_SHAPES)
            assert shapes.CLASS_NAMES[ex["label"]] == f"{colour} {shape}", ex["caption"]


def test_all_classes_appear_roughly_uniformly():
    labels = [generator.sample_scene(shapes.SPLIT_SEEDS["test"], i).label for i in range(2000)]
    counts = np.bincount(labels, minlength=30)
    assert len(counts) == 30
    assert counts.min() >= 35 and counts.max() <= 110, counts  # expected 66.7 each


def test_main_object_is_largest_and_answers_match_the_image():
    n_questions = {"count": 0, "color": 0, "background": 0}
    for i in range(300):
        ex = shapes.render_example(shapes.SPLIT_SEEDS["validation"], i)
        image = ex["image"]
        main_colour, main_shape = shapes.CLASS_NAMES[ex["label"]].split()
        counts = _object_pixel_counts(image)
        present = {c for c, n in counts.items() if n >= 3}
        assert main_colour in present, ex["caption"]
        assert max(counts, key=counts.get) == main_colour, (ex["caption"], counts)
        if len(present) > 1:  # distractors are small and much smaller than the main object
            second = sorted(counts.values())[-2]
            assert counts[main_colour] > 1.3 * second, (ex["caption"], counts)
        q, a = ex["question"], ex["answer"]
        if q == "how many shapes are there?":
            assert NUMBERS[a] == len(present), (ex["caption"], counts)
            n_questions["count"] += 1
        elif q.startswith("what color is the"):
            assert a == main_colour
            n_questions["color"] += 1
        elif q == "is the background light or dark?":
            luminance = image[0, 0].astype(float).mean()  # corners are always background
            assert a == ("light" if luminance > 128 else "dark")
            n_questions["background"] += 1
        else:
            assert q == f"what shape is the {main_colour} object?" and a == main_shape, q
    assert min(n_questions.values()) > 20, n_questions


def test_caption_lists_agree_with_image_colours():
    checked = 0
    for i in range(400):
        ex = shapes.render_example(shapes.SPLIT_SEEDS["train"], i)
        if ex["caption"].startswith("there is"):
            named = {w for w in re.findall(r"[a-z]+", ex["caption"]) if w in EXPECTED_COLORS}
            present = {c for c, n in _object_pixel_counts(ex["image"]).items() if n >= 1}
            assert named == present, (ex["caption"], present)
            checked += 1
    assert checked > 30


def test_spatial_relations_agree_with_object_centroids():
    pattern = re.compile(r"(left of|right of|above|below) an? (?:small |large )?(\w+) (\w+)\.")
    checked = 0
    for i in range(600):
        ex = shapes.render_example(shapes.SPLIT_SEEDS["test"], i)
        match = pattern.search(ex["caption"])
        if not match:
            continue
        relation, other_colour = match.group(1), match.group(2)
        main_colour = shapes.CLASS_NAMES[ex["label"]].split()[0]
        (my, mx), (oy, ox) = [np.argwhere(np.all(ex["image"] == generator.COLORS[c], -1)).mean(0)
                              for c in (main_colour, other_colour)]
        dx, dy = ox - mx, oy - my
        expected = (("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else
                    ("above" if dy > 0 else "below"))
        if abs(abs(dx) - abs(dy)) > 2:  # centroids of drawn pixels: skip near-diagonal cases
            assert relation == expected, ex["caption"]
            checked += 1
    assert checked > 50


def test_generation_is_fast():
    start = time.perf_counter()
    for i in range(500):
        shapes.render_example(shapes.SPLIT_SEEDS["train"], i)
    # ~0.1 s on one core; 20k images must stay well under 30 s.
    assert time.perf_counter() - start < 5.0


def test_tiny_dataset_reads_back_exactly(tiny_data_dir):  # noqa: F811
    sources = tfds.data_source("shapes/64px", data_dir=tiny_data_dir)
    sizes = {"train": TINY_NUM_TRAIN, "validation": TINY_NUM_EVAL, "test": TINY_NUM_EVAL,
             "test_heldout": TINY_NUM_EVAL}
    assert {s: len(sources[s]) for s in SPLITS} == sizes
    for split in SPLITS:
        for i in (0, 1, sizes[split] - 1):
            record = sources[split][i]
            ref = shapes.render_example(shapes.SPLIT_SEEDS[split], i)
            image = np.asarray(Image.open(io.BytesIO(record["image"])))
            np.testing.assert_array_equal(image, ref["image"])  # PNG is lossless
            assert record["index"] == i
            assert int(record["label"]) == ref["label"]
            for key in ("caption", "question", "answer"):
                assert record[key].decode() == ref[key]
    # The stored metadata is readable without the builder class and without tensorflow.
    builder = tfds.builder_from_directory(shapes.dataset_dir(tiny_data_dir))
    assert builder.info.features["label"].names == shapes.CLASS_NAMES


def test_tokenizer_is_stored_with_the_dataset(tiny_data_dir):  # noqa: F811
    tokenizer = SentencePieceTokenizer(shapes.tokenizer_path(tiny_data_dir), 64)
    assert tokenizer.vocab_size == 256
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    captions = [shapes.render_example(shapes.SPLIT_SEEDS["test"], i, 32)["caption"]
                for i in range(50)]
    tokens = tokenizer.encode(captions)
    assert not np.any(tokens == 1), "a test caption word is unknown to the tokenizer"
    assert tokenizer.decode(tokens) == captions


def test_prepare_is_idempotent_and_checks_sizes(tiny_data_dir):  # noqa: F811
    ds_dir = shapes.dataset_dir(tiny_data_dir)
    info_mtime = (ds_dir / "dataset_info.json").stat().mtime
    again = shapes.prepare(tiny_data_dir, num_train=TINY_NUM_TRAIN, num_eval=TINY_NUM_EVAL,
                           process_index=0)
    assert again == ds_dir
    # Sizes left unspecified accept the existing dataset.
    assert shapes.prepare(tiny_data_dir, process_index=0) == ds_dir
    assert shapes.prepare(tiny_data_dir, num_eval=TINY_NUM_EVAL, process_index=1) == ds_dir
    assert (ds_dir / "dataset_info.json").stat().mtime == info_mtime
    with pytest.raises(DataError, match="split sizes"):
        shapes.prepare(tiny_data_dir, num_train=TINY_NUM_TRAIN + 1, process_index=0)
    with pytest.raises(DataError, match="split sizes"):
        shapes.prepare(tiny_data_dir, num_eval=TINY_NUM_EVAL - 1, process_index=1)
    with pytest.raises(DataError, match=">= 1 example"):
        shapes.prepare(tiny_data_dir, num_train=0, process_index=0)
    with pytest.raises(DataError, match="Unknown shapes config"):
        shapes.prepare(tiny_data_dir, config="128px", process_index=0)


def test_only_process_zero_builds_and_others_wait(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        shapes.prepare(tmp_path, config="32px", num_train=20, num_eval=5, process_index=1,
                       timeout_s=0.2)
    assert not (tmp_path / "shapes").exists(), "process 1 must not build"

    results = {}
    waiter = threading.Thread(target=lambda: results.update(p1=shapes.prepare(
        tmp_path, config="32px", num_train=20, num_eval=5, process_index=1, timeout_s=60)))
    waiter.start()
    built = shapes.prepare(tmp_path, config="32px", num_train=20, num_eval=5, process_index=0,
                           progress=False)
    waiter.join(timeout=60)
    assert results["p1"] == built == shapes.dataset_dir(tmp_path, "32px")
    record = tfds.data_source("shapes/32px", data_dir=tmp_path)["test_heldout"][4]
    image = np.asarray(Image.open(io.BytesIO(record["image"])))
    ref = shapes.render_example(shapes.SPLIT_SEEDS["test_heldout"], 4, image_size=32)
    np.testing.assert_array_equal(image, ref["image"])


def test_a_build_in_worker_processes_writes_the_serial_build_byte_for_byte(
        tiny_data_dir, tmp_path, monkeypatch):  # noqa: F811
    """The tiny fixture is built in this process (too small for a pool); the same sizes built
    by 2 worker processes must give the same record files and tokenizer."""
    from input_pipeline.shapes import builder
    monkeypatch.setattr(builder, "_PARALLEL_MIN_EXAMPLES", 1)
    monkeypatch.setattr(builder, "_workers", lambda: 2)
    pools = []
    real_pool = builder._render_pool

    @contextlib.contextmanager
    def spy(total):
        with real_pool(total) as pool:
            pools.append(pool)
            yield pool
    monkeypatch.setattr(builder, "_render_pool", spy)
    parallel = shapes.prepare(tmp_path, num_train=TINY_NUM_TRAIN, num_eval=TINY_NUM_EVAL,
                              process_index=0, progress=False)
    assert pools and pools[0] is not None, "the build did not go through a worker pool"
    serial = shapes.dataset_dir(tiny_data_dir)

    def digests(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()
                if "array_record" in p.name or p.name.endswith(".model")}
    got, want = digests(parallel), digests(serial)
    assert len(want) >= 5 and got == want  # 4 splits' record files and the tokenizer
