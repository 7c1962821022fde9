"""Sample filters (config.data.filters): metadata predicates, caption length, aspect ratio,
their skip reasons and counts through the pair pipeline, and their config errors.

Every expectation is written out by hand from the sample it describes (no filter code is
re-implemented here).
"""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from input_pipeline import pipeline, sources, transforms
from input_pipeline.tokenizers import load_tokenizer
from input_pipeline.transforms import DecodePair, MetadataPredicate, SampleFilters
from vlm_jax import configs
from vlm_jax import data as data_lib
from vlm_jax.config import ConfigError


@pytest.mark.parametrize("predicate, metadata, want", [
    ("similarity >= 0.28", {"similarity": 0.28}, None),
    ("similarity >= 0.28", {"similarity": 0.2799}, "metadata:similarity"),
    ("similarity >= 0.28", {}, "metadata_missing:similarity"),
    ("similarity >= 0.28", {"similarity": None}, "metadata_missing:similarity"),
    ("similarity >= 0.28", {"similarity": "0.3"}, None),  # CSV input: columns are strings
    ("similarity >= 0.28", {"similarity": "n/a"}, "metadata:similarity"),
    ("similarity >= 0.28", {"similarity": float("nan")}, "metadata:similarity"),
    ("similarity>=0.28", {"similarity": 0.5}, None),
    ("punsafe < 0.1", {"punsafe": 0.1}, "metadata:punsafe"),
    ("punsafe < 0.1", {"punsafe": 0.0999}, None),
    ("width > 200", {"width": 200}, "metadata:width"),
    ("width > 200", {"width": 201}, None),
    ("width <= 200", {"width": 200}, None),
    ("width <= 200", {"width": "wide"}, "metadata:width"),
    ("NSFW != 'UNSURE'", {"NSFW": "UNLIKELY"}, None),
    ("NSFW != 'UNSURE'", {"NSFW": "UNSURE"}, "metadata:NSFW"),
    ("NSFW == 'UNLIKELY'", {"NSFW": "unlikely"}, "metadata:NSFW"),
    ("NSFW in ['UNLIKELY', 'NSFW']", {"NSFW": "NSFW"}, None),
    ("NSFW in ['UNLIKELY', 'NSFW']", {"NSFW": "UNSURE"}, "metadata:NSFW"),
    ("NSFW not in ('UNSURE',)", {"NSFW": "UNSURE"}, "metadata:NSFW"),
    ("NSFW not in ('UNSURE',)", {"NSFW": "UNLIKELY"}, None),
    ("status == 'success'", {"status": "success"}, None),
    ("original_width >= 256", {"original_width": 255}, "metadata:original_width"),
    ("exif.Model == 'X100'", {"exif": {"Model": "X100"}}, None),
    ("exif.Model == 'X100'", {"exif": {}}, "metadata_missing:exif.Model"),
    ("exif.Model == 'X100'", {"exif.Model": "X100"}, None),  # a dotted key as it is
    ("LICENSE in ['cc-by', 'cc0']", {"LICENSE": ["cc-by"]}, "metadata:LICENSE"),
])
def test_metadata_predicates(predicate, metadata, want):
    assert MetadataPredicate.parse(predicate).check(metadata) == want


@pytest.mark.parametrize("text, why", [
    ("similarity", "not of the form"),
    ("similarity = 0.3", "not of the form"),
    ("similarity >= ", "not of the form"),
    ("origin ['x']", "not of the form"),  # 'in' needs whitespace: not 'orig in [...]'
    ("3d >= 1", "not of the form"),
    ("similarity >= 0.3.1", "not a Python literal"),
    ("similarity >= high", "not a Python literal"),
    ("similarity >= __import__('os').getpid()", "not a Python literal"),
    ("similarity >= [0.3]", "needs a number or a string"),
    ("NSFW in 'UNSURE", "not a Python literal"),
    ("NSFW in 3", "needs a list"),
    ("NSFW == None", "counts as missing"),
])
def test_bad_predicates_are_refused_naming_them(text, why):
    with pytest.raises(ValueError, match=why) as info:
        MetadataPredicate.parse(text)
    assert repr(text) in str(info.value)


def test_caption_limits():
    f = SampleFilters.create(min_caption_chars=5, max_caption_chars=12, min_caption_words=2,
                             max_caption_words=3)
    assert f.check_caption("a b") == "caption_too_short"  # 3 chars
    assert f.check_caption("abcde") == "caption_too_short"  # 5 chars but 1 word
    assert f.check_caption("ab cd") is None  # 5 chars, 2 words
    assert f.check_caption("ab cd efgh") is None  # 10 chars, 3 words
    assert f.check_caption("a b c d") == "caption_too_long"  # 7 chars, 4 words
    assert f.check_caption("abcdef ghijkl") == "caption_too_long"  # 13 chars, 2 words
    assert SampleFilters().check_caption("x") is None  # 0: no limit
    # DecodePair collapses whitespace before counting: "  ab \n cd  " is "ab cd".
    reason, _, caption = DecodePair(filters=f)._check(
        {"image": _png(20, 20), "caption": b"  ab \n cd  "})
    assert (reason, caption) == (None, "ab cd")


@pytest.mark.parametrize("limits, why", [
    (dict(max_aspect_ratio=0.5), "at least 1"),
    (dict(min_caption_words=-1), "must be a number >= 0"),
    (dict(max_caption_chars="10"), "must be a number >= 0"),
    (dict(min_caption_chars=20, max_caption_chars=10), "no caption would pass"),
    (dict(min_similarity=0.3), "Unknown sample filter"),
])
def test_bad_limits_are_refused(limits, why):
    with pytest.raises(ValueError, match=why):
        SampleFilters.create(**limits)


def _png(w, h, seed=0):
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_aspect_ratio_is_read_from_the_header_before_decoding():
    f = SampleFilters.create(max_aspect_ratio=3.0)
    decode = DecodePair(filters=f)
    ok = {"caption": "a wide image"}
    assert decode._check({**ok, "image": _png(90, 30)})[0] is None  # 3.0: at the limit
    assert decode._check({**ok, "image": _png(30, 90)})[0] is None
    assert decode._check({**ok, "image": _png(91, 30)})[0] == "extreme_aspect_ratio"
    assert decode._check({**ok, "image": _png(20, 61)})[0] == "extreme_aspect_ratio"
    # The header alone decides: a PNG cut after its header is corrupt without the filter,
    # and rejected for its shape (never decoded) with it.
    cut = _png(100, 20)[:64]
    assert DecodePair()._check({**ok, "image": cut})[0] == "corrupt_image"
    assert decode._check({**ok, "image": cut})[0] == "extreme_aspect_ratio"
    # Decoded arrays (TFDS sources) too: 40 x 10 is 4:1.
    array = np.zeros((10, 40, 3), np.uint8)
    assert decode._check({**ok, "image": array})[0] == "extreme_aspect_ratio"
    assert DecodePair()._check({**ok, "image": array})[0] is None


def _sample(i, similarity=0.5, nsfw="UNLIKELY", caption=None, size=(40, 30), meta=True):
    members = {"png": _png(*size, seed=i),
               "txt": (caption if caption is not None else f"a photo number {i}").encode()}
    if meta is True:
        record = {"key": f"{i:06d}", "NSFW": nsfw}
        if similarity is not ...:
            record["similarity"] = similarity
        members["json"] = json.dumps(record).encode()
    elif meta is not None:
        members["json"] = meta
    return f"{i:06d}", members


# (sample, the reason it is skipped for, None = kept) under FILTERS, in checking order:
# caption length, then the metadata predicates in order, then the image header.
FILTERS = dict(max_aspect_ratio=3.0, min_caption_words=2, max_caption_words=20,
               metadata=["similarity >= 0.28", "NSFW != 'UNSURE'"])
LONG = " ".join(["word"] * 21)
CASES = [
    *[(_sample(i), None) for i in range(8)],
    (_sample(8, similarity=0.1), "metadata:similarity"),
    (_sample(9, similarity=0.2799), "metadata:similarity"),
    (_sample(10, similarity=...), "metadata_missing:similarity"),  # no such field
    (_sample(11, similarity=None), "metadata_missing:similarity"),  # null
    (_sample(12, nsfw="UNSURE"), "metadata:NSFW"),
    (_sample(13, similarity="0.9"), None),  # a string column (CSV input)
    (_sample(14, meta=b"{not json"), "bad_json"),
    (_sample(15, meta=None), "metadata_missing:similarity"),  # no .json member
    (_sample(16, caption="one"), "caption_too_short"),
    (_sample(17, caption=LONG), "caption_too_long"),
    (_sample(18, size=(100, 20)), "extreme_aspect_ratio"),
    (_sample(19, size=(90, 30)), None),
    (_sample(20, similarity=0.1, caption="one"), "caption_too_short"),  # caption first
    (_sample(21, similarity=0.1, size=(100, 20)), "metadata:similarity"),  # before the header
    (_sample(22, similarity=0.28), None),
    (_sample(23), None),
]
WANT_COUNTS = {"seen": 24, "skipped": 12, "skipped/metadata:similarity": 3,
               "skipped/metadata_missing:similarity": 3, "skipped/metadata:NSFW": 1,
               "skipped/bad_json": 1, "skipped/caption_too_short": 2,
               "skipped/caption_too_long": 1, "skipped/extreme_aspect_ratio": 1}


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_each_sample_gets_its_reason(tmp_path):
    src = sources.WebDatasetSource(_shard(tmp_path / "s.tar", [s for s, _ in CASES]))
    decode = DecodePair(filters=SampleFilters.create(**FILTERS))
    got = [decode._check(src[i])[0] for i in range(len(src))]
    assert got == [want for _, want in CASES]


def test_pipeline_counts_filtered_samples_by_reason(tmp_path):
    """Through create_pair_iterator from a config, and summed as train logs them."""
    src = sources.WebDatasetSource(_shard(tmp_path / "s.tar", [s for s, _ in CASES]))
    config = configs.base_config()
    config.data.filters.update(FILTERS)
    transforms.SKIP_STATS.reset()
    it = pipeline.create_pair_iterator(
        src, tokenizer=load_tokenizer("clip_bpe", 16), global_batch_size=4, seed=0,
        image_size=16, process_index=0, process_count=1, num_epochs=1,
        filters=data_lib.sample_filters(config))
    batches = list(it)
    assert sum(len(b["image"]) for b in batches) == 12  # the 12 kept samples, 3 full batches
    assert transforms.SKIP_STATS.snapshot() == WANT_COUNTS
    logged = data_lib.global_skip_stats()
    assert {k: v for k, v in logged.items() if v} == WANT_COUNTS


def test_config_errors_name_the_filter():
    config = configs.base_config()
    config.data.filters.metadata = ["similarity >= 0.3", "NSFW =! 'UNSURE'"]
    with pytest.raises(ConfigError, match=r"config\.data\.filters.*NSFW =! 'UNSURE'"):
        data_lib.sample_filters(config)
    config.data.filters.metadata = []
    config.data.filters.max_aspect_ratio = 0.3
    with pytest.raises(ConfigError, match="max_aspect_ratio=0.3"):
        data_lib.sample_filters(config)
    # The shapes dataset is not filtered: a filter set for it is refused, not ignored.
    config = configs.base_config()
    config.data.filters.metadata = ["similarity >= 0.3"]
    with pytest.raises(ConfigError, match="unset them"):
        data_lib.prepare(config)


def test_a_field_no_sample_has_is_refused_before_training(tmp_path):
    """A misspelt field would skip every sample (and the run would wait for a first batch that
    never comes): prepare() reads the first samples' metadata and names the fields they have."""
    shard = _shard(tmp_path / "s.tar", [_sample(i) for i in range(4)])
    config = configs.base_config()
    config.data.update(name="webdataset", train_files=shard)
    config.data.filters.metadata = ["similarity >= 0.28", "clip_score >= 0.3"]
    with pytest.raises(ConfigError, match=r"'clip_score >= 0.3'.*\['NSFW', 'key', 'similarity'\]"):
        data_lib.prepare(config)
    # Present in one of the first samples only (nulls elsewhere) is enough.
    src = sources.WebDatasetSource(_shard(tmp_path / "t.tar", [
        _sample(0, similarity=...), _sample(1, similarity=None), _sample(2)]))
    data_lib.check_metadata_fields(src, SampleFilters.create(metadata=["similarity > 0"]))
    src = sources.WebDatasetSource(_shard(tmp_path / "u.tar", [_sample(0, meta=None)]))
    with pytest.raises(ConfigError, match="no metadata"):
        data_lib.check_metadata_fields(src, SampleFilters.create(metadata=["similarity > 0"]))


def test_streamed_shards_are_filtered_and_counted_alike(tmp_path):
    """webdataset_mode='stream' applies the same filters: one epoch of the streamed shard keeps
    the same 12 samples and counts the same reasons as the indexed pipeline above."""
    path = _shard(tmp_path / "s.tar", [s for s, _ in CASES])
    config = configs.base_config()
    config.data.filters.update(FILTERS)
    transforms.SKIP_STATS.reset()
    it = pipeline.create_webdataset_stream_iterator(
        sources.WebDatasetShards(path), tokenizer=load_tokenizer("clip_bpe", 16),
        global_batch_size=4, seed=0, image_size=16, shuffle_buffer=1, process_index=0,
        process_count=1, filters=data_lib.sample_filters(config))
    kept = sum(len(next(it)["image"]) for _ in range(3))
    assert kept == 12
    stats = transforms.SKIP_STATS.snapshot()
    assert {k: v for k, v in stats.items() if k != "seen" and v} == \
        {k: v for k, v in WANT_COUNTS.items() if k != "seen"}
    # A misspelt metadata field is refused from the first streamed samples, before training.
    with pytest.raises(ConfigError, match="clip_score"):
        data_lib.check_metadata_fields(sources.WebDatasetShards(path), transforms.SampleFilters
                                       .create(metadata=["clip_score >= 0.3"]))
