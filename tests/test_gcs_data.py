"""Training and evaluation data read from gs://, against a GCS API emulator (fake-gcs-server).

Each kind of data is written to local disk, uploaded to the emulator, and read back through the
real clients (gcsfs via etils.epath for listing and tar shards; array_record's C++ reader,
google-cloud-cpp, for ArrayRecord and TFDS records): the batches must equal those read from the
local copy. Missing buckets, patterns matching nothing and a half-configured emulator give a
DataError naming the path, fast.
"""

import pathlib
import sys
import time

import numpy as np
import pytest
from etils import epath

from input_pipeline import DataError, eval_data, pipeline, sources
from input_pipeline.shapes import builder as shapes_builder
from input_pipeline.tokenizers import SentencePieceTokenizer
from tests.data_fixtures import tiny_data_dir  # noqa: F401
from tests.test_sources import good, write_shard


@pytest.fixture(scope="module")
def bucket(gcs_emulator):
    return gcs_emulator.create_bucket("vlm-data")


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):  # noqa: F811
    return SentencePieceTokenizer(str(shapes_builder.tokenizer_path(tiny_data_dir)),
                                  context_length=16)


def _upload(local: epath.Path, remote: str) -> None:
    """Copies a local file or directory tree to ``remote`` through etils.epath (gcsfs)."""
    local = pathlib.Path(local)
    files = [local] if local.is_file() else [p for p in local.rglob("*") if p.is_file()]
    for f in files:
        dst = epath.Path(remote) / f.relative_to(local) if f != local else epath.Path(remote)
        dst.parent.mkdir(parents=True, exist_ok=True)
        epath.Path(f).copy(dst, overwrite=True)


def _batches(source, tokenizer, n=4):
    it = pipeline.create_pair_iterator(source, tokenizer=tokenizer, global_batch_size=4, seed=7,
                                       image_size=16, process_index=0, process_count=1)
    return [next(it) for _ in range(n)]


def _assert_same_batches(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_webdataset_shards_on_gcs_train_like_local(tmp_path, bucket, tokenizer):
    local = tmp_path / "wds"
    local.mkdir()
    for s in range(3):
        write_shard(local / f"shard-{s:05d}.tar", [good(i) for i in range(8 * s, 8 * s + 8)])
        _upload(local / f"shard-{s:05d}.tar", f"{bucket}/wds/shard-{s:05d}.tar")
    remote = [f"{bucket}/wds/shard-{s:05d}.tar" for s in range(3)]
    # Brace ranges and globs expand to the same shards on gs:// as on disk.
    assert sources.expand_paths(f"{bucket}/wds/shard-{{00000..00002}}.tar") == remote
    assert sources.expand_paths(f"{bucket}/wds/shard-*.tar") == remote
    assert sources.expand_paths(f"{bucket}/wds/shard-0000[12].tar") == remote[1:]

    want = sources.WebDatasetSource(str(local / "shard-*.tar"))
    got = sources.WebDatasetSource(f"{bucket}/wds/shard-{{00000..00002}}.tar")
    assert len(got) == len(want) == 24 and not got.skipped_shards
    for i in (0, 9, 23):  # Members are read by offset from the gs:// objects.
        g, w = got[i], want[i]
        assert (g["key"], g["image"], g["caption"], g["metadata"]) == (
            w["key"], w["image"], w["caption"], w["metadata"])
    _assert_same_batches(_batches(got, tokenizer), _batches(want, tokenizer))


def test_missing_gcs_shard_in_a_brace_range_is_skipped_and_named(tmp_path, bucket):
    write_shard(tmp_path / "a.tar", [good(i) for i in range(4)])
    _upload(tmp_path / "a.tar", f"{bucket}/gap/s-0.tar")
    src = sources.WebDatasetSource(f"{bucket}/gap/s-{{0..1}}.tar")
    assert len(src) == 4
    assert [p for p, _ in src.skipped_shards] == [f"{bucket}/gap/s-1.tar"]
    with pytest.raises(DataError, match="No samples"):
        sources.WebDatasetSource(f"{bucket}/gap/s-{{5..6}}.tar")


def test_array_record_on_gcs_trains_like_local(tmp_path, bucket, tokenizer):
    records = [{"key": f"{i:04d}", "image": good(i)[1]["png"], "caption": f"caption {i}",
                "metadata": None} for i in range(20)]
    local = sources.write_array_record(records, str(tmp_path / "ar" / "pairs"), num_shards=2)
    remote = sources.write_array_record(records, f"{bucket}/ar/pairs", num_shards=2)
    assert [p.rsplit("/", 1)[1] for p in remote] == [p.rsplit("/", 1)[1] for p in local]
    want = sources.ArrayRecordSource(str(tmp_path / "ar" / "pairs-*.array_record"))
    got = sources.ArrayRecordSource(f"{bucket}/ar/pairs-*.array_record")
    assert len(got) == len(want) == 20
    assert [got[i] for i in range(20)] == [want[i] for i in range(20)]
    _assert_same_batches(_batches(got, tokenizer), _batches(want, tokenizer))


def test_grain_worker_process_reads_a_gcs_mixture_like_local(tmp_path, bucket, tokenizer):
    # Grain's worker processes reopen the sources: gcsfs for the tar members, array_record's
    # C++ client for the ArrayRecord shards. A weighted mixture of both kinds, read by one
    # worker process from gs://, must give the batches of the local copies read in-process.
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (as vlm_jax.main does)
        flags.FLAGS(sys.argv[:1], known_only=True)
    write_shard(tmp_path / "m.tar", [good(i) for i in range(12)])
    remote = f"{bucket}/mixture"  # the layout of tmp_path
    _upload(tmp_path / "m.tar", f"{remote}/m.tar")
    records = [{"key": f"{i:04d}", "image": good(i)[1]["png"], "caption": f"c {i}",
                "metadata": None} for i in range(100, 112)]
    sources.write_array_record(records, str(tmp_path / "mix" / "p"))
    sources.write_array_record(records, f"{remote}/mix/p")

    def batches(root, worker_count):
        mixture = [(sources.WebDatasetSource(f"{root}/m.tar"), 1.0),
                   (sources.ArrayRecordSource(f"{root}/mix/p-*.array_record"), 1.0)]
        it = pipeline.create_pair_iterator(mixture, tokenizer=tokenizer, global_batch_size=4,
                                           seed=5, image_size=16, process_index=0,
                                           process_count=1, worker_count=worker_count)
        try:
            return [next(it) for _ in range(4)]
        finally:
            it.close()

    want = batches(str(tmp_path), 0)
    got = batches(remote, 1)
    _assert_same_batches(got, want)


def test_tfds_data_dir_on_gcs_reads_like_local(bucket, tiny_data_dir):  # noqa: F811
    data_dir = f"{bucket}/tfds"
    _upload(pathlib.Path(tiny_data_dir) / "shapes", f"{data_dir}/shapes")
    kw = dict(dataset="shapes", config_name="64px", global_batch_size=8, seed=3,
              context_length=16, process_index=0, process_count=1)
    want = pipeline.create_train_iterator(data_dir=tiny_data_dir, **kw)
    got = pipeline.create_train_iterator(data_dir=data_dir, **kw)
    _assert_same_batches([next(got) for _ in range(3)], [next(want) for _ in range(3)])

    ref = pipeline.load_eval_split(data_dir=tiny_data_dir, split="train", context_length=16)
    ev = pipeline.load_eval_split(data_dir=data_dir, split="train", context_length=16)
    for k in ref:
        np.testing.assert_array_equal(np.asarray(ev[k]), np.asarray(ref[k]), err_msg=k)

    # An entry's dataset tfds:<name> with eval.data_dir on gs://.
    ref = eval_data.load_tfds_classification("shapes/64px", split="test", data_dir=tiny_data_dir,
                                             image_size=32)
    ev = eval_data.load_tfds_classification("shapes/64px", split="test", data_dir=data_dir,
                                            image_size=32)
    assert ev.keys() == ref.keys()
    for k in ref:
        if isinstance(ref[k], np.ndarray):
            np.testing.assert_array_equal(ev[k], ref[k], err_msg=k)
        else:
            assert ev[k] == ref[k], k

    src = sources.open_source("tfds", "shapes/64px@train", data_dir=data_dir)
    local = sources.open_source("tfds", "shapes/64px@train", data_dir=tiny_data_dir)
    assert len(src) == len(local) and src[5]["image"] == local[5]["image"]


@pytest.mark.parametrize("pattern, kind", [
    ("gs://no-such-bucket-vlm/shards/*.tar", "webdataset"),
    ("gs://no-such-bucket-vlm/shards/00000.tar", "webdataset"),
    ("{bucket}/nothing-here/*.tar", "webdataset"),
    ("{bucket}/nothing-here/part-00000.tar", "webdataset"),
    ("gs://no-such-bucket-vlm/ar/*.array_record", "array_record"),
    ("{bucket}/nothing-here/*.array_record", "array_record"),
])
def test_gcs_listing_without_matches_is_a_fast_data_error(bucket, pattern, kind):
    pattern = pattern.format(bucket=bucket)
    start = time.monotonic()
    with pytest.raises(DataError, match="No file matches") as e:
        sources.open_source(kind, pattern)
    assert pattern in str(e.value)
    assert time.monotonic() - start < 5


def test_missing_array_record_shard_on_gcs_is_a_fast_data_error(bucket):
    # A brace range is not stat'ed shard by shard; array_record reports the missing object.
    path = f"{bucket}/nothing-here/pairs-{{00000..00001}}-of-00002.array_record"
    start = time.monotonic()
    with pytest.raises(DataError, match="Cannot open ArrayRecord shards.*nothing-here"):
        sources.ArrayRecordSource(path)
    assert time.monotonic() - start < 5


def test_tfds_data_dir_in_a_missing_bucket_is_a_fast_data_error():
    start = time.monotonic()
    with pytest.raises(DataError, match="No prepared dataset at gs://no-such-bucket-vlm/tfds"):
        pipeline.create_train_iterator(data_dir="gs://no-such-bucket-vlm/tfds", dataset="shapes",
                                       config_name="64px", global_batch_size=8, seed=0,
                                       context_length=16, process_index=0, process_count=1)
    assert time.monotonic() - start < 5


def test_array_record_gcs_client_not_pointed_at_the_emulator_fails_fast(bucket, monkeypatch):
    # gcsfs (STORAGE_EMULATOR_HOST) sees the emulator; array_record's google-cloud-cpp client
    # would go to storage.googleapis.com and retry for minutes: refused up front instead.
    records = [{"key": "k", "image": b"x", "caption": "c", "metadata": None}] * 2
    sources.write_array_record(records, f"{bucket}/half/pairs")
    monkeypatch.delenv("CLOUD_STORAGE_EMULATOR_ENDPOINT")
    start = time.monotonic()
    with pytest.raises(DataError, match="CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        sources.ArrayRecordSource(f"{bucket}/half/pairs-*.array_record")
    with pytest.raises(DataError, match="CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        pipeline.create_train_iterator(data_dir=f"{bucket}/tfds", global_batch_size=8, seed=0,
                                       context_length=16, process_index=0, process_count=1)
    with pytest.raises(DataError, match="CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        eval_data.load_tfds_classification("shapes/64px", split="test",
                                           data_dir=f"{bucket}/tfds", image_size=32)
    assert time.monotonic() - start < 5


def test_array_record_on_gcs_without_credentials_fails_fast(monkeypatch, tmp_path):
    # Real GCS, no Application Default Credentials: google-cloud-cpp would ask the GCE metadata
    # server for a token and retry for minutes; refused up front, naming the path and the fix.
    for var in ("STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # not on a GCP VM
    path = "gs://vlm-data/ar/pairs-00000-of-00002.array_record"
    start = time.monotonic()
    with pytest.raises(DataError, match="(?s)pairs-00000-of-00002.*application-default login"):
        sources.ArrayRecordSource(path)
    with pytest.raises(DataError, match="no Google credentials"):
        sources.open_source("tfds", "shapes/64px@train", data_dir="gs://vlm-data/tfds")
    assert time.monotonic() - start < 5
