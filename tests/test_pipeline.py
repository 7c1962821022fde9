"""Tests of tokenizers, transforms and grain pipelines (input_pipeline/*.py)."""

import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from input_pipeline import DataError, pipeline, shapes, transforms
from input_pipeline.tokenizers import SentencePieceTokenizer, train_sentencepiece
from tests.data_fixtures import TINY_NUM_TRAIN, tiny_data_dir  # noqa: F401

CONTEXT = 32


@pytest.fixture(scope="module")
def spm_path(tiny_data_dir):  # noqa: F811
    return str(shapes.tokenizer_path(tiny_data_dir))


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _train_iterator(data_dir, **kwargs):
    args = dict(data_dir=data_dir, global_batch_size=20, seed=0, context_length=CONTEXT,
                process_index=0, process_count=1)
    return pipeline.create_train_iterator(**{**args, **kwargs})


# --- tokenizers --------------------------------------------------------------------------------

def test_encode_frames_pieces_with_bos_eos_and_pads(spm_path):
    tok = SentencePieceTokenizer(spm_path, context_length=CONTEXT)
    reference = spm.SentencePieceProcessor(model_file=spm_path)
    captions = ["a large red circle left of a small blue square.", "a green star."]
    tokens = tok.encode(captions)
    assert tokens.dtype == np.int32 and tokens.shape == (2, CONTEXT)
    for row, caption in zip(tokens, captions):
        pieces = reference.encode(caption)
        n = len(pieces)
        assert row[0] == reference.bos_id() == 2
        assert row[1:1 + n].tolist() == pieces
        assert row[1 + n] == reference.eos_id() == 3
        assert np.all(row[2 + n:] == 0)
        assert np.argmax(row == tok.eos_id) == 1 + n  # the text tower's pooling position
    assert tok.decode(tokens) == captions
    assert tok.decode(tokens[1]) == captions[1]
    assert tok.content_lengths(tokens).tolist() == [len(reference.encode(c)) for c in captions]


def test_truncation_keeps_eos_last(spm_path):
    long_caption = "there is a large red star, a small yellow square and a small orange cross."
    full = SentencePieceTokenizer(spm_path, context_length=64).encode([long_caption])[0]
    n_real = int(np.sum(full != 0))
    assert n_real > 8
    short = SentencePieceTokenizer(spm_path, context_length=8).encode([long_caption])[0]
    assert short.tolist() == full[:7].tolist() + [3]
    exact = SentencePieceTokenizer(spm_path, context_length=n_real).encode([long_caption])[0]
    assert exact.tolist() == full[:n_real].tolist()


def test_empty_caption_and_errors(spm_path, tmp_path):
    tok = SentencePieceTokenizer(spm_path, context_length=6)
    assert tok.encode([""]).tolist() == [[2, 3, 0, 0, 0, 0]]
    assert tok.content_lengths(tok.encode(["", "a red star."])).tolist()[0] == 0
    with pytest.raises(TypeError):
        tok.encode("a red star.")
    with pytest.raises(DataError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="context_length"):
        SentencePieceTokenizer(spm_path, context_length=1)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model"):
        SentencePieceTokenizer(tmp_path / "bad.model")


def test_tokenizer_pickles(spm_path):
    tok = SentencePieceTokenizer(spm_path, context_length=CONTEXT)
    clone = pickle.loads(pickle.dumps(tok))
    captions = ["a purple cross above a small green circle."]
    np.testing.assert_array_equal(clone.encode(captions), tok.encode(captions))
    assert clone.context_length == CONTEXT


def test_train_sentencepiece_is_deterministic(tmp_path):
    texts = ["a red circle.", "a blue square on a dark background.", "there is a green star."]
    texts = texts * 50
    a = train_sentencepiece(texts, tmp_path / "a", vocab_size=64)
    b = train_sentencepiece(texts, tmp_path / "sub" / "b", vocab_size=64)
    assert open(a, "rb").read() == open(b, "rb").read()
    tok = SentencePieceTokenizer(a, context_length=16)
    assert tok.decode(tok.encode(["a blue star."])) == ["a blue star."]


# --- transforms --------------------------------------------------------------------------------

def test_decode_image():
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    out = transforms.DecodeImage().map({"image": _png(rgb), "label": 1})
    np.testing.assert_array_equal(out["image"], rgb)
    assert out["label"] == 1
    grey = rgb[..., 0]
    out = transforms.DecodeImage().map({"image": _png(grey)})
    np.testing.assert_array_equal(out["image"], np.stack([grey] * 3, -1))
    out = transforms.DecodeImage().map({"image": grey[..., None]})
    assert out["image"].shape == (9, 7, 3)
    with pytest.raises(DataError, match="'image'"):
        transforms.DecodeImage().map({"image": b"garbage"})


def test_resize_center_crop():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the central 40x40 square is white
    out = transforms.ResizeCenterCrop(16).map({"image": image})["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[2:-2, 2:-2].min() >= 250
    # torchvision's arithmetic (open_clip's eval transform), by hand: 10x17 -> short side 8,
    # long side int(8 * 17 / 10) = 13 (not round(13.6) = 14); crop left int(round(2.5)) = 2.
    rng = np.random.default_rng(0)
    odd = rng.integers(0, 256, (10, 17, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(odd).resize((13, 8), Image.Resampling.BICUBIC))[:, 2:10]
    np.testing.assert_array_equal(transforms.ResizeCenterCrop(8).map({"image": odd})["image"],
                                  want)
    same = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    assert transforms.ResizeCenterCrop(16).map({"image": same})["image"] is same


def test_select_features_drops_strings():
    out = transforms.SelectFeatures(transforms.MODEL_FEATURES).map(
        {"image": np.zeros((2, 2, 3)), "text": [1, 2], "label": 5, "caption": b"x"})
    assert set(out) == {"image", "text", "label"}
    assert out["label"].dtype == np.int32 and out["image"].dtype == np.uint8
    with pytest.raises(DataError, match="text"):
        transforms.SelectFeatures(transforms.MODEL_FEATURES).map({"image": 0, "label": 0})


# --- pipelines ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_reference(tiny_data_dir):  # noqa: F811
    """All train examples in record order, through the eval path (index of each image)."""
    ref = pipeline.load_eval_split(data_dir=tiny_data_dir, split="train",
                                   context_length=CONTEXT)
    index = {row.tobytes(): i for i, row in enumerate(ref["image"])}
    assert len(index) == TINY_NUM_TRAIN
    return ref, index


def test_load_eval_split(tiny_data_dir):  # noqa: F811
    ev = pipeline.load_eval_split(data_dir=tiny_data_dir, split="test_heldout",
                                  context_length=CONTEXT, max_examples=10)
    # uint8 pixels as rendered (the model normalises them on the device).
    assert ev["image"].shape == (10, 64, 64, 3) and ev["image"].dtype == np.uint8
    assert ev["text"].shape == (10, CONTEXT) and ev["text"].dtype == np.int32
    assert ev["label"].dtype == np.int32
    assert ev["class_names"] == shapes.CLASS_NAMES
    assert tuple(ev["templates"]) == tuple(shapes.ZERO_SHOT_TEMPLATES)
    for i in range(10):
        ref = shapes.render_example(shapes.SPLIT_SEEDS["test_heldout"], i)
        np.testing.assert_array_equal(ev["image"][i], ref["image"])
        assert ev["label"][i] == ref["label"]
        assert ev["caption"][i] == ref["caption"]
        assert (ev["question"][i], ev["answer"][i]) == (ref["question"], ref["answer"])
    tok = pipeline.tokenizer_for(tiny_data_dir, context_length=CONTEXT)
    assert tok.decode(ev["text"]) == ev["caption"]
    resized = pipeline.load_eval_split(data_dir=tiny_data_dir, context_length=CONTEXT,
                                       max_examples=2, image_size=32)
    assert resized["image"].shape == (2, 32, 32, 3)


def test_train_batches_are_shuffled_records(tiny_data_dir, train_reference):  # noqa: F811
    ref, index = train_reference
    batch = next(_train_iterator(tiny_data_dir))
    assert set(batch) == {"image", "text", "label"}
    assert batch["image"].shape == (20, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (20, CONTEXT) and batch["text"].dtype == np.int32
    assert batch["label"].shape == (20,) and batch["label"].dtype == np.int32
    ids = [index[row.tobytes()] for row in batch["image"]]
    assert ids != sorted(ids), "train order must be shuffled"
    np.testing.assert_array_equal(batch["label"], ref["label"][ids])
    np.testing.assert_array_equal(batch["text"], ref["text"][ids])


def _epoch_ids(data_dir, index, **kwargs) -> list[int]:
    return [index[row.tobytes()]
            for batch in _train_iterator(data_dir, num_epochs=1, **kwargs)
            for row in batch["image"]]


def test_processes_read_disjoint_shards_covering_the_epoch(tiny_data_dir,  # noqa: F811
                                                           train_reference):
    _, index = train_reference
    p0 = _epoch_ids(tiny_data_dir, index, process_index=0, process_count=2)
    p1 = _epoch_ids(tiny_data_dir, index, process_index=1, process_count=2)
    assert len(p0) == len(p1) == TINY_NUM_TRAIN // 2  # 10 local batches of 10 each
    assert not set(p0) & set(p1)
    assert sorted(p0 + p1) == list(range(TINY_NUM_TRAIN))
    single = _epoch_ids(tiny_data_dir, index)
    assert sorted(single) == list(range(TINY_NUM_TRAIN))
    assert _epoch_ids(tiny_data_dir, index) == single, "same seed, same order"
    assert _epoch_ids(tiny_data_dir, index, seed=1) != single, "another seed, another order"


def test_global_batch_does_not_depend_on_process_count(tiny_data_dir,  # noqa: F811
                                                       train_reference):
    """Step t's global batch is the same records on 1, 2 or 4 hosts (each reads only its part)."""
    _, index = train_reference

    def steps(count, n=12):
        its = [_train_iterator(tiny_data_dir, process_index=i, process_count=count)
               for i in range(count)]
        return [[index[row.tobytes()] for it_batch in (next(it) for it in its)
                 for row in it_batch["image"]] for _ in range(n)]

    single = steps(1)
    # 12 batches of 20 cross the epoch boundary of the 200 records (reshuffled per epoch).
    assert sorted(i for b in single[:10] for i in b) == list(range(200))
    for count in (2, 4):
        multi = steps(count)
        assert [len(b) for b in multi] == [20] * 12
        assert [sorted(b) for b in multi] == [sorted(b) for b in single]


def test_resume_from_iterator_state(tiny_data_dir):  # noqa: F811
    it = _train_iterator(tiny_data_dir, seed=3)
    batches, state = [], None
    for step in range(5):
        batches.append(next(it))
        if step == 1:
            state = it.get_state()
    resumed = _train_iterator(tiny_data_dir, seed=3)
    resumed.set_state(state)
    for expected in batches[2:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_train_iterator_errors(tiny_data_dir, tmp_path):  # noqa: F811
    with pytest.raises(DataError, match="not divisible"):
        _train_iterator(tiny_data_dir, global_batch_size=21, process_count=2)
    with pytest.raises(DataError, match="fewer than one global batch"):
        _train_iterator(tiny_data_dir, global_batch_size=2 * TINY_NUM_TRAIN)
    with pytest.raises(DataError, match="no split 'dev'"):
        _train_iterator(tiny_data_dir, split="dev")
    with pytest.raises(DataError, match=f"{tmp_path}.*prepare"):
        _train_iterator(tmp_path)
    with pytest.raises(DataError, match="32px"):
        _train_iterator(tiny_data_dir, config_name="32px")
