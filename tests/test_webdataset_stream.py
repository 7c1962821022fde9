"""Streamed webdataset (config.data.webdataset_mode 'stream' / 'resampled'): shard-level
assignment, shuffle buffer, exact resume, unreadable shards, and a killed training run that
resumes with the losses of an uninterrupted one."""
import json
import tarfile

import numpy as np
import pytest

from input_pipeline import DataError, pipeline, sources, transforms
from input_pipeline.tokenizers import load_tokenizer
from tests.test_sources import good, write_shard
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config as config_lib
from vlm_jax import data as data_lib
from vlm_jax.config import ConfigError


def _shards(root, counts, start=0):
    """Tar shards ``s-<i>.tar`` with ``counts[i]`` good samples each; returns their paths."""
    paths, key = [], start
    for i, n in enumerate(counts):
        path = root / f"s-{i:03d}.tar"
        write_shard(path, [good(key + j) for j in range(n)])
        paths.append(str(path))
        key += n
    return paths


def _keys_in_tar(path):
    """The sample keys of a tar shard as Python's tarfile lists them (the reference)."""
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def _first_epoch(it):
    """The keys a reader with shuffle_buffer=1 (records in shard order) gives in epoch 0."""
    keys = []
    while True:
        record = next(it)
        if it.get_state()["epoch"] > 0:  # this one opened the next epoch
            return keys
        keys.append(record["key"])


def _reader(paths, worker=0, workers=1, **kw):
    ds = sources.WebDatasetStream(paths, **kw)
    if workers > 1:  # what grain does to the dataset copy of each worker process
        ds.set_slice(slice(worker, None, workers))
    return iter(ds)


def test_each_shard_is_read_once_per_epoch_by_one_reader(tmp_path):
    counts = [5, 3, 4, 6, 2, 5]
    paths = _shards(tmp_path, counts)
    readers = [(p, w) for p in range(2) for w in range(2)]  # 2 processes x 2 grain workers
    epoch0 = {}
    for p, w in readers:
        it = _reader(paths, w, 2, shuffle_buffer=1, seed=7, process_index=p, process_count=2)
        epoch0[(p, w)] = _first_epoch(it)
    # Epoch 0: every sample of every shard exactly once, over all readers.
    everything = sorted(k for path in paths for k in _keys_in_tar(path))
    got = sorted(k for keys in epoch0.values() for k in keys)
    assert got == everything
    # Each reader reads whole shards: its keys are a union of shards.
    by_shard = {k: i for i, path in enumerate(paths) for k in _keys_in_tar(path)}
    for keys in epoch0.values():
        shards = {by_shard[k] for k in keys}
        assert len(keys) == sum(counts[s] for s in shards)


def test_shard_order_is_reshuffled_per_epoch_and_differs_by_seed(tmp_path):
    paths = _shards(tmp_path, [1] * 12)  # one sample per shard: the keys are the shard order

    def order(seed, n):
        it = _reader(paths, shuffle_buffer=1, seed=seed)
        return [next(it)["key"] for _ in range(n)]

    a = order(0, 24)
    assert sorted(a[:12]) == sorted(a[12:]) and a[:12] != a[12:]
    assert order(0, 24) == a and order(1, 24) != a


@pytest.mark.parametrize("mode", ["stream", "resampled"])
def test_resume_continues_exactly_buffer_included(tmp_path, mode):
    paths = _shards(tmp_path, [7, 5, 9, 4])
    kw = dict(mode=mode, seed=3, shuffle_buffer=6, samples_per_epoch=10, process_index=1,
              process_count=2)
    ref_it = _reader(paths, **kw)
    ref = [next(ref_it) for _ in range(40)]
    for k in (1, 4, 11, 23):  # at the start, mid shard, across shards and epochs
        it = _reader(paths, **kw)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        assert len(state["buffer"]) == kw["shuffle_buffer"] - 1
        resumed = _reader(paths, **kw)
        resumed.set_state(state)
        got = [next(resumed) for _ in range(40 - k)]
        assert [r["key"] for r in got] == [r["key"] for r in ref[k:]]
        assert all(a["image"] == b["image"] and a["caption"] == b["caption"]
                   for a, b in zip(got, ref[k:]))
    # The buffer shuffles: not the order the shards are read in.
    plain = _reader(paths, **{**kw, "shuffle_buffer": 1})
    assert [r["key"] for r in ref[:20]] != [next(plain)["key"] for _ in range(20)]


def test_resampled_draws_shards_with_replacement_per_reader(tmp_path):
    paths = _shards(tmp_path, [1] * 5)
    kw = dict(mode="resampled", seed=0, shuffle_buffer=1, samples_per_epoch=40, process_count=2)
    draws = {}
    for p in range(2):
        it = _reader(paths, process_index=p, **kw)
        draws[p] = [next(it)["key"] for _ in range(60)]
        assert it.get_state()["epoch"] == 2  # 20 samples per reader and epoch
    a = draws[0]
    assert set(a) == {f"{i:06d}" for i in range(5)}  # every shard drawn
    assert len(set(a[:5])) < 5 or len(set(a[5:10])) < 5  # with replacement: repeats
    assert draws[0] != draws[1]  # readers draw independently
    # A stream mode epoch, for contrast, reads each shard exactly once.
    it = _reader(paths, mode="stream", seed=0, shuffle_buffer=1)
    assert sorted(next(it)["key"] for _ in range(5)) == sorted(set(a))


def test_unreadable_shards_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    good_paths = _shards(tmp_path, [4])
    (tmp_path / "s-001.tar").write_bytes(b"not a tar file " * 100)
    write_shard(tmp_path / "s-002.tar", [good(i) for i in range(10, 16)])
    data = (tmp_path / "s-002.tar").read_bytes()
    (tmp_path / "s-002.tar").write_bytes(data[: len(data) // 2])  # cut mid-shard
    paths = sources.expand_paths(str(tmp_path / "s-*.tar"))
    # The reference: the samples of the cut shard that Python's tarfile reads whole.
    whole = set()
    with tarfile.open(paths[2]) as tar:
        try:
            for m in tar:
                tar.extractfile(m).read()
                whole.add(m.name.split(".")[0])
        except tarfile.TarError:
            pass
    transforms.SKIP_STATS.reset()
    keys = set(_first_epoch(_reader(paths, shuffle_buffer=1, seed=0)))
    assert _keys_in_tar(good_paths[0]) <= keys
    assert 0 < len(keys - _keys_in_tar(good_paths[0])) < 6
    assert keys - _keys_in_tar(good_paths[0]) <= whole  # no partial sample kept
    assert transforms.SKIP_STATS.snapshot()["skipped/unreadable_shard"] == 2
    assert "s-001.tar" in caplog.text and "s-002.tar" in caplog.text

    (tmp_path / "s-000.tar").write_bytes(b"")
    only_bad = [paths[0], paths[1]]
    with pytest.raises(DataError, match="read no sample from"):
        next(_reader(only_bad, shuffle_buffer=1))


def test_gcs_shards_stream_and_resume_like_local(tmp_path, gcs_emulator):
    """gs:// shards (GCS API emulator, gcsfs through etils.epath) stream the records of their
    local copies, resume from a state taken mid-shard, and a shard missing from a brace range
    is skipped and counted."""
    from tests.test_gcs_data import _upload  # pylint: disable=import-outside-toplevel

    bucket = gcs_emulator.create_bucket("vlm-wds-stream")
    local = _shards(tmp_path, [6, 4, 7])
    for i, path in enumerate(local):
        _upload(path, f"{bucket}/s-{i:03d}.tar")
    remote = sources.WebDatasetShards(f"{bucket}/s-{{000..003}}.tar").paths  # 003 is missing
    kw = dict(seed=5, shuffle_buffer=5)
    want = _reader([*local, str(tmp_path / "missing.tar")], **kw)
    want = [next(want) for _ in range(30)]
    transforms.SKIP_STATS.reset()
    it = _reader(remote, **kw)
    got = [next(it) for _ in range(12)]
    state = json.loads(json.dumps(it.get_state()))
    resumed = _reader(remote, **kw)
    resumed.set_state(state)
    got += [next(resumed) for _ in range(18)]
    assert [(r["key"], r["image"], r["caption"]) for r in got] == [
        (r["key"], r["image"], r["caption"]) for r in want]
    assert transforms.SKIP_STATS.snapshot()["skipped/unreadable_shard"] >= 1


@pytest.fixture(scope="module")
def clip_bpe():
    return load_tokenizer("clip_bpe", 16)


def test_pipeline_skips_bad_samples_and_resumes_exactly(tmp_path, clip_bpe):
    samples = [good(i) for i in range(20)]
    samples[3] = (samples[3][0], {"png": b"\x89PNG broken", "txt": b"broken"})
    samples[11] = (samples[11][0], {"png": samples[11][1]["png"]})  # no caption
    for s in range(4):
        write_shard(tmp_path / f"p-{s}.tar", samples[5 * s:5 * s + 5])
    shards = sources.WebDatasetShards(str(tmp_path / "p-{0..3}.tar"))

    def make():
        return pipeline.create_webdataset_stream_iterator(
            shards, tokenizer=clip_bpe, global_batch_size=4, seed=1, image_size=16,
            shuffle_buffer=5, process_index=0, process_count=1)

    transforms.SKIP_STATS.reset()
    ref_it = make()
    ref = [next(ref_it) for _ in range(9)]  # 36 samples: 2 epochs of 18 good ones
    stats = transforms.SKIP_STATS.snapshot()
    assert stats["skipped/corrupt_image"] >= 1 and stats["skipped/missing_caption"] >= 1
    assert stats["seen"] - stats["skipped"] == 36  # every kept sample is in a batch
    assert ref[0]["image"].shape == (4, 16, 16, 3) and ref[0]["image"].dtype == np.uint8
    it = make()
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make()
    resumed.set_state(state)
    for want in ref[4:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_another_process_or_worker_count_is_refused(tmp_path, clip_bpe):
    paths = _shards(tmp_path, [4, 4])

    def make(process_index=0, process_count=1, worker_count=0):
        return pipeline.create_webdataset_stream_iterator(
            paths, tokenizer=clip_bpe, global_batch_size=2, seed=0, image_size=16,
            shuffle_buffer=2, process_index=process_index, process_count=process_count,
            worker_count=worker_count)

    it = make()
    next(it)
    handler = ckpt_lib.DataIteratorHandler()
    (tmp_path / "data").mkdir()
    handler.save(tmp_path / "data", item=it)
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot be re-mapped; resume with the "
                                                       "process count that wrote it"):
        handler.restore(tmp_path / "data", item=make(1, 2))
    state = it.get_state()
    with pytest.raises(DataError, match="worker_count 0 -> 2"):
        make(worker_count=2).set_state(state)
    with pytest.raises(DataError, match="2 tar shard.* 1 process.* 3 grain worker"):
        make(worker_count=3)
    with pytest.raises(DataError, match="webdataset_mode"):
        pipeline.StreamIterator(lambda s: None, global_batch_size=2, process_index=0,
                                process_count=1).set_state(state)


def test_config_keys_are_checked(repo_root):
    path = f"{repo_root / 'experiments' / 'clip_tiny.py'}:test"
    bad = config_lib.load_config(path, ["data.name=webdataset", "data.webdataset_mode=streamed",
                                        "data.train_files=x.tar"])
    with pytest.raises(ConfigError, match="webdataset_mode='streamed'"):
        data_lib.prepare(bad)
    mixed = config_lib.load_config(path, ["data.name=webdataset", "data.webdataset_mode=stream"])
    mixed.data.mixture = [dict(name="webdataset", train_files="x.tar", weight=1.0)]
    with pytest.raises(ConfigError, match="mixture"):
        data_lib.prepare(mixed)


@pytest.mark.slow
def test_grain_workers_resume_exactly(tmp_path, clip_bpe):
    """2 grain worker processes, each reading its own shards: grain's state of the workers holds
    each reader's cursor and buffer, and a restored pipeline continues with the same batches."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (as vlm_jax.main does)
        flags.FLAGS.mark_as_parsed()
    paths = _shards(tmp_path, [7, 6, 8, 5])

    def make():
        return pipeline.create_webdataset_stream_iterator(
            paths, tokenizer=clip_bpe, global_batch_size=4, seed=0, image_size=16,
            shuffle_buffer=4, process_index=0, process_count=1, worker_count=2)

    it = make()
    ref = [next(it) for _ in range(8)]
    it.close()
    it = make()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = make()
    resumed.set_state(state)
    for want in ref[3:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    resumed.close()


@pytest.fixture(scope="module")
def stream_battery(tmp_path_factory, shapes_data_dir):
    """The fault battery's runs (tests/reliability/battery.py) on the shapes train split exported
    as 11 webdataset tar shards, read with webdataset_mode='stream'."""
    from input_pipeline import tools  # pylint: disable=import-outside-toplevel
    from tests.reliability import battery as battery_lib  # pylint: disable=import-outside-toplevel

    root = tmp_path_factory.mktemp("wds_stream")
    tools.export_webdataset(shapes_data_dir, "shapes", "32px", "train", str(root / "shards"),
                            shard_size=50)
    # Synchronous saves: a kill after step 5 always finds step 4's checkpoint, so the resume
    # starts mid-run, past shard boundaries, with a full buffer to restore.
    extra = ("--config.data.name=webdataset", "--config.data.webdataset_mode=stream",
             f"--config.data.train_files={root}/shards/train-*.tar",
             "--config.data.shuffle_buffer=64", "--config.checkpoint.async_save=false")

    class StreamBattery(battery_lib.Battery):
        def args(self, workdir, *more, **kw):
            return super().args(workdir, *extra, *more, **kw)

    return StreamBattery(root / "runs", shapes_data_dir, seed=1)


@pytest.mark.e2e
@pytest.mark.slow  # three short training runs: ~80 s on 2 busy cores
def test_sigkilled_stream_run_resumes_with_the_uninterrupted_losses(stream_battery):
    from tests.reliability import battery as battery_lib  # pylint: disable=import-outside-toplevel

    row = stream_battery.sigkill()  # SIGKILL of `vlm-jax train` at a random step, then rerun
    ref = stream_battery.reference()
    got = battery_lib.losses(stream_battery.root / "sigkill")
    print(f"\n{row.detail}\nstep  uninterrupted  killed+resumed")
    for step in sorted(ref):
        print(f"{step:4d}  {ref[step]!r:>18}  {got.get(step)!r:>18}")
    failed = [k for k, v in row.checks.items() if not v]
    assert row.survived and not failed, (row, failed)
    assert row.data_lost == "none", row  # bitwise equal losses after the resume
    start = int(row.detail.rsplit("resumed from ", 1)[1])
    assert start >= battery_lib.EVERY  # a mid-run state: 64 + 63 samples read, shard 2
    # The checkpoints hold the streamed reader's state: cursor, offset, buffer positions.
    ckpts = stream_battery.root / "sigkill" / "checkpoints"
    last = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    saved = json.loads((ckpts / str(last) / "data" / "process_0-of-1.json").read_text())
    assert saved["webdataset_stream"] == "stream"
    reader = saved["iterator"]
    while "cursor" not in reader:  # grain's batch / map / filter states wrap the reader's
        reader = reader["parent"]
    assert len(reader["buffer"]) == 63 and (reader["cursor"], reader["offset"]) != (0, 0)
