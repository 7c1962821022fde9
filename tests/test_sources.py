"""Webdataset tar and ArrayRecord sources, bad samples skipped and counted, pair iterator."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from input_pipeline import DataError, pipeline, sources, transforms
from input_pipeline.shapes import builder as shapes_builder
from input_pipeline.tokenizers import SentencePieceTokenizer
from tests.data_fixtures import tiny_data_dir  # noqa: F401


def _image_bytes(seed, size=(40, 30), fmt="PNG"):
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        out, format=fmt)
    return out.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples):
    """samples: list of (key, {ext: bytes}) written in order, as img2dataset does."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)


def good(i, fmt="png"):
    pil_fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    return (f"{i:06d}", {fmt: _image_bytes(i, fmt=pil_fmt), "txt": f"caption {i}".encode(),
                         "json": json.dumps({"key": i}).encode()})


def test_expand_paths(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    got = sources.expand_paths(str(tmp_path / "s-{000..002}.tar"))
    assert got == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert sources.expand_paths(str(tmp_path / "s-*.tar")) == got
    with pytest.raises(DataError, match="s-008.tar"):
        sources.expand_paths(str(tmp_path / "s-{008..009}.tar"))


def test_webdataset_source_reads_every_format(tmp_path):
    samples = [good(0, "png"), good(1, "jpg"), good(2, "webp")]
    write_shard(tmp_path / "a.tar", samples)
    src = sources.WebDatasetSource(str(tmp_path / "a.tar"))
    assert len(src) == 3
    for i, (key, members) in enumerate(samples):
        r = src[i]
        assert r["key"] == key and r["caption"] == members["txt"]
        assert r["image"] == next(v for k, v in members.items() if k in ("png", "jpg", "webp"))
        assert json.loads(r["metadata"]) == {"key": i}
    decoded = transforms.DecodePair().map(src[1])
    assert decoded["image"].shape == (30, 40, 3) and decoded["caption"] == "caption 1"


def test_corrupt_and_truncated_shards_are_skipped_not_fatal(tmp_path):
    write_shard(tmp_path / "s-0.tar", [good(i) for i in range(4)])
    (tmp_path / "s-1.tar").write_bytes(b"this is not a tar file" * 100)
    write_shard(tmp_path / "s-2.tar", [good(i) for i in range(10, 16)])
    data = (tmp_path / "s-2.tar").read_bytes()
    (tmp_path / "s-2.tar").write_bytes(data[: len(data) // 2])  # Cut mid-shard.
    src = sources.WebDatasetSource(str(tmp_path / "s-*.tar"))
    skipped = dict(src.skipped_shards)
    assert str(tmp_path / "s-1.tar") in skipped
    assert 4 < len(src) < 10  # Shard 0 whole, shard 2 up to the cut, shard 1 nothing.
    stats = transforms.SkipStats()
    # Every sample that was indexed either decodes or is skipped with a reason.
    for i in range(len(src)):
        reason, _, _ = transforms.DecodePair()._check(src[i])  # pylint: disable=protected-access
        stats.record(reason)
    assert stats.seen == len(src)


@pytest.mark.parametrize("members,reason", [
    ({"txt": b"no image"}, "missing_image"),
    ({"png": None, "txt": None}, "missing_caption"),
    ({"png": None, "txt": b"\xff\xfe bad utf8"}, "caption_not_utf8"),
    ({"png": None, "txt": b"  \n "}, "empty_caption"),
    ({"png": b"\x89PNG\r\n\x1a\n truncated", "txt": b"x"}, "corrupt_image"),
    ({"jpg": "truncated-jpeg", "txt": b"x"}, "corrupt_image"),
    ({"png": "1x1", "txt": b"a tracking pixel"}, "image_too_small"),
    ({"png": "huge", "txt": b"a bomb"}, "image_too_large"),
])
def test_bad_samples_are_skipped_with_reason(tmp_path, members, reason):
    members = dict(members)
    for ext, v in list(members.items()):
        if ext == "txt" and v is None:
            del members[ext]
        elif v is None:
            members[ext] = _image_bytes(1)
        elif v == "1x1":
            members[ext] = _image_bytes(1, size=(1, 1))
        elif v == "huge":  # 20000 x 20000: only the header is read.
            out = io.BytesIO()
            Image.new("L", (20000, 20000)).save(out, format="PNG")
            members[ext] = out.getvalue()
        elif v == "truncated-jpeg":
            members[ext] = _image_bytes(2, fmt="JPEG")[:200]
    write_shard(tmp_path / "bad.tar", [good(0), ("bad", members), good(1)])
    src = sources.WebDatasetSource(str(tmp_path / "bad.tar"))
    assert len(src) == 3
    stats_before = transforms.SKIP_STATS.snapshot()
    out = [transforms.DecodePair().map(src[i]) for i in range(3)]
    assert [("_skip" in o) for o in out] == [False, True, False]
    assert out[1]["_skip"] == reason
    after = transforms.SKIP_STATS.snapshot()
    assert after[f"skipped/{reason}"] == stats_before.get(f"skipped/{reason}", 0) + 1


def test_array_record_round_trip(tmp_path):
    records = [{"key": f"k{i}", "image": _image_bytes(i), "caption": f"c {i}",
                "metadata": None} for i in range(7)]
    paths = sources.write_array_record(records, str(tmp_path / "out" / "pairs"), num_shards=2)
    assert len(paths) == 2 and not list((tmp_path / "out").glob("*.tmp"))
    src = sources.ArrayRecordSource(str(tmp_path / "out" / "pairs-*.array_record"))
    assert len(src) == 7
    got = {src[i]["key"]: src[i] for i in range(7)}
    for r in records:
        assert got[r["key"]]["image"] == r["image"] and got[r["key"]]["caption"] == r["caption"]


@pytest.fixture(scope="module")
def spm_tokenizer(tiny_data_dir):  # noqa: F811
    return SentencePieceTokenizer(str(shapes_builder.tokenizer_path(tiny_data_dir)),
                                  context_length=16)


def _tar_dataset(tmp_path, n, bad_every=0):
    shards = []
    for s in range(2):
        samples = []
        for i in range(s * n // 2, (s + 1) * n // 2):
            key, members = good(i)
            if bad_every and i % bad_every == 0:
                members = {"png": members["png"], "txt": b""}  # empty caption
            samples.append((key, members))
        write_shard(tmp_path / f"d-{s}.tar", samples)
        shards.append(str(tmp_path / f"d-{s}.tar"))
    return sources.WebDatasetSource(shards)


def test_pair_iterator_processes_cover_each_record_once(tmp_path, spm_tokenizer):
    src = _tar_dataset(tmp_path, 40)
    def keys(pi, pc):
        it = pipeline.create_pair_iterator(src, tokenizer=spm_tokenizer, global_batch_size=8,
                                           seed=1, image_size=16, process_index=pi,
                                           process_count=pc, num_epochs=1)
        batches = list(it)
        assert all(b["image"].shape == (8 // pc, 16, 16, 3) for b in batches)
        return [t.tobytes() for b in batches for t in b["image"]]  # random images: unique
    single = keys(0, 1)
    p0, p1 = keys(0, 2), keys(1, 2)
    assert len(single) == 40 and len(p0) == len(p1) == 20
    assert sorted(p0 + p1) == sorted(single)
    assert len(set(single)) == 40  # Every record once per epoch.


def test_pair_iterator_skips_bad_samples_and_resumes(tmp_path, spm_tokenizer):
    src = _tar_dataset(tmp_path, 40, bad_every=5)  # 8 of 40 have an empty caption.
    transforms.SKIP_STATS.reset()
    make = lambda: pipeline.create_pair_iterator(  # noqa: E731
        src, tokenizer=spm_tokenizer, global_batch_size=4, seed=3, image_size=16,
        process_index=0, process_count=1)
    it = make()
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    later = [next(it) for _ in range(4)]
    stats = transforms.SKIP_STATS.snapshot()
    assert stats["skipped"] == stats["skipped/empty_caption"] > 0
    assert all(b["image"].shape[0] == 4 for b in batches + later)  # Batches stay full.
    resumed = make()
    resumed.set_state(state)
    for want in later:
        got = next(resumed)
        np.testing.assert_array_equal(got["text"], want["text"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_random_resized_crop_is_reproducible_and_covers_most_of_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    op = transforms.RandomResizedCrop(32)
    a = op.random_map({"image": image}, np.random.default_rng(7))["image"]
    b = op.random_map({"image": image}, np.random.default_rng(7))["image"]
    c = op.random_map({"image": image}, np.random.default_rng(8))["image"]
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A constant image stays constant (crop + bicubic resize of a flat field).
    flat = np.full((50, 70, 3), 77, np.uint8)
    assert np.all(op.random_map({"image": flat}, np.random.default_rng(1))["image"] == 77)


def test_two_process_streams_resume_exactly(tmp_path, spm_tokenizer):
    """Each process's iterator state restores its own position: hashes of the batches after the
    restore equal those of the uninterrupted streams, on both processes."""
    import hashlib

    src = _tar_dataset(tmp_path, 40, bad_every=7)

    def make(pi):
        return pipeline.create_pair_iterator(src, tokenizer=spm_tokenizer, global_batch_size=6,
                                             seed=5, image_size=16, process_index=pi,
                                             process_count=2)

    def digest(batch):
        return hashlib.sha256(batch["image"].tobytes() + batch["text"].tobytes()).hexdigest()

    for pi in (0, 1):
        it = make(pi)
        for _ in range(4):
            next(it)
        state = it.get_state()
        want = [digest(next(it)) for _ in range(12)]  # crosses an epoch boundary
        resumed = make(pi)
        resumed.set_state(state)
        assert [digest(next(resumed)) for _ in range(12)] == want, pi


def test_weighted_mixture_follows_weights(tmp_path, spm_tokenizer):
    def shard(name, caption):
        samples = [(f"{name}{i:04d}", {"png": _image_bytes(i), "txt": caption.encode()})
                   for i in range(40)]
        write_shard(tmp_path / f"{name}.tar", samples)
        return sources.WebDatasetSource(str(tmp_path / f"{name}.tar"))

    a, b = shard("a", "a blue square."), shard("b", "a red circle.")
    b_tokens = spm_tokenizer.encode(["a red circle."])[0]
    it = pipeline.create_pair_iterator([(a, 3.0), (b, 1.0)], tokenizer=spm_tokenizer,
                                       global_batch_size=8, seed=0, image_size=16,
                                       process_index=0, process_count=1)
    rows = np.concatenate([next(it)["text"] for _ in range(20)])
    from_b = int(np.sum(np.all(rows == b_tokens, axis=1)))
    assert 36 <= from_b <= 44, from_b  # 160 samples at weights 3:1: 40 expected
    with pytest.raises(DataError, match="weight"):
        pipeline.create_pair_iterator([(a, 0.0)], tokenizer=spm_tokenizer, global_batch_size=8,
                                      seed=0, image_size=16, process_index=0, process_count=1)


def test_tfds_source_reads_a_prepared_dataset(tiny_data_dir):  # noqa: F811
    ref = pipeline.load_eval_split(data_dir=tiny_data_dir, split="train", context_length=16)
    src = sources.open_source("tfds", "shapes/64px@train", data_dir=tiny_data_dir)
    assert len(src) == len(ref["label"])
    out = transforms.DecodePair().map(src[3])
    assert out["image"].shape == (64, 64, 3) and out["caption"] == ref["caption"][3]
    by_label = sources.open_source("tfds", "shapes/64px@train", data_dir=tiny_data_dir,
                                   caption_key="label:a photo of a {}.")
    caption = by_label[3]["caption"]
    assert caption.startswith("a photo of a ") and caption.endswith(".")
    assert ref["class_names"][ref["label"][3]] in caption
    with pytest.raises(DataError, match="not prepared"):
        sources.open_source("tfds", "no_such_dataset@train", data_dir=tiny_data_dir)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_convert_image_folder_with_captions(tmp_path, fmt):
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i in range(5):
        (folder / f"p{i}.png").write_bytes(_image_bytes(i))
        rows.append({"file": f"p{i}.png", "caption": f"photo {i}, with a comma"})
    rows.append({"file": "missing.png", "caption": "no such image"})
    if fmt == "csv":
        import csv
        path = tmp_path / "captions.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "caption"])
            w.writeheader()
            w.writerows(rows)
    else:
        path = tmp_path / "captions.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from input_pipeline import tools
    tools.convert_to_array_record(str(folder), str(tmp_path / "ar" / "pairs"), 2, str(path),
                                  keep_bad=True, progress=False)
    src = sources.ArrayRecordSource(str(tmp_path / "ar" / "pairs-*.array_record"))
    got = {src[i]["key"]: src[i] for i in range(len(src))}
    assert len(got) == 6
    assert got["p3"]["image"] == (folder / "p3.png").read_bytes()
    assert got["p3"]["caption"] == "photo 3, with a comma"
    # keep_bad: the missing image is kept as a record and skipped (and counted) by the pipeline.
    assert transforms.DecodePair().map(got["missing"])["_skip"] == "missing_image"
    # By default it is dropped (and counted) by the conversion.
    report = tools.convert_shards(str(folder), str(tmp_path / "ar2" / "pairs"), 2, str(path),
                                  progress=False)
    assert len(sources.ArrayRecordSource(report.paths)) == 5
    assert report.stats["skipped/missing_image"] == 1 and report.stats["written"] == 5
