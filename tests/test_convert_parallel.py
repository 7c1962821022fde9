"""`vlm-jax data convert` at scale: parallel workers and hosts, resumption, gs:// outputs.

The reference for what a conversion must write is independent of the converter: the input
shards read through :class:`input_pipeline.sources.WebDatasetSource` (index-then-seek, not the
converter's streaming reader) and judged by the training pipeline's own checks
(:class:`input_pipeline.transforms.DecodePair`). Runs with other worker / process counts, a
killed-and-restarted run, and a run into a GCS bucket (fake-gcs-server) must write the same
bytes as the one-worker run.
"""

import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest
from etils import epath

from input_pipeline import DataError, sources, tools
from input_pipeline.transforms import DecodePair
from tests.test_sources import _image_bytes, write_shard

BAD = {  # sample index % 13 -> how the sample is broken, and the reason training gives
    1: ("missing_caption", lambda m: {"jpg": m["jpg"]}),
    3: ("missing_image", lambda m: {"txt": m["txt"], "json": m["json"]}),
    5: ("corrupt_image", lambda m: {**m, "jpg": m["jpg"][: len(m["jpg"]) // 3]}),
    7: ("image_too_small", lambda m: {**m, "jpg": _image_bytes(0, (4, 4), "JPEG")}),
    9: ("empty_caption", lambda m: {**m, "txt": b"  \n"}),
    11: ("caption_not_utf8", lambda m: {**m, "txt": b"\xff\xfe caption"}),
}


def _write_inputs(root, shards, per_shard, size=(48, 32), distinct=8):
    """``shards`` img2dataset-like tar shards of JPEG samples, a sixth of them bad in every way
    of :data:`BAD`; returns the shard paths. ``distinct`` images are encoded and reused (the
    records still differ by key, caption and metadata)."""
    images = [_image_bytes(i, size, "JPEG") for i in range(distinct)]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        samples = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            m = {"jpg": images[i % distinct], "txt": f"a photo number {i}".encode(),
                 "json": f'{{"i": {i}}}'.encode()}
            if i % 13 in BAD and i % 2:
                m = BAD[i % 13][1](m)
            samples.append((f"{i:08d}", m))
        path = root / f"part-{s:05d}.tar"
        write_shard(path, samples)
        paths.append(str(path))
    return paths


def _reference(paths):
    """(set of the good records, skip counts by reason) read through WebDatasetSource."""
    src = sources.WebDatasetSource(paths)
    good, counts, check = set(), {}, DecodePair()
    for i in range(len(src)):
        r = src[i]
        reason = check._check(r)[0]  # pylint: disable=protected-access
        if reason is None:
            good.add((r["key"], r["image"], r["caption"], r["metadata"]))
        else:
            counts[reason] = counts.get(reason, 0) + 1
    return good, counts


def _records(paths):
    src = sources.ArrayRecordSource(paths)
    return [(r["key"], r["image"], r["caption"], r["metadata"])
            for r in (src[i] for i in range(len(src)))]


def _bytes(paths):
    return [epath.Path(p).read_bytes() for p in paths]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    paths = _write_inputs(root, shards=6, per_shard=26)
    (root / "part-00006.tar").write_bytes(b"this is not a tar file" * 40)  # damaged shard
    return root, paths + [str(root / "part-00006.tar")]


@pytest.fixture(scope="module")
def one_worker(inputs, tmp_path_factory):
    """The reference conversion: one worker in this process, one output per input shard."""
    root, _ = inputs
    out = tmp_path_factory.mktemp("ar1")
    return tools.convert_shards(str(root / "part-*.tar"), str(out / "train"), progress=False)


def test_one_worker_writes_the_records_training_would_keep(inputs, one_worker):
    _, paths = inputs
    want, counts = _reference(paths[:-1])  # WebDatasetSource skips the damaged shard itself
    report = one_worker
    assert len(report.paths) == 7 and report.converted == report.paths
    got = _records(report.paths)
    assert len(got) == len(set(got)) == len(want)  # no duplicate
    assert set(got) == want
    assert {k.split("/", 1)[1]: v for k, v in report.stats.items() if "/" in k} == counts
    assert len(counts) == len(BAD)  # every kind of bad sample occurred and was counted
    assert report.stats["seen"] == 6 * 26 and report.stats["written"] == len(want)
    assert [p for p, _ in report.damaged] == [paths[-1]]
    assert "ReadError" in report.damaged[0][1] and paths[-1] in report.summary()
    # Input shard j -> output shard j, in input order.
    first = _records(report.paths[:1])
    assert [k for k, *_ in first] == sorted(k for k, *_ in want if int(k) < 26)


def test_workers_and_hosts_write_the_files_of_one_worker(inputs, one_worker, tmp_path):
    root, _ = inputs
    pattern = str(root / "part-*.tar")
    two = tools.convert_shards(pattern, str(tmp_path / "w2" / "train"), workers=2,
                               progress=False)
    assert two.workers == 2 and _bytes(two.paths) == _bytes(one_worker.paths)
    assert two.stats == one_worker.stats
    # Two "hosts" of one worker each, and a grouping of 2-3 input shards per output shard.
    grouped = tools.convert_shards(pattern, str(tmp_path / "g1" / "train"), num_shards=3,
                                   progress=False)
    hosts = [tools.convert_shards(pattern, str(tmp_path / "g2" / "train"), num_shards=3,
                                  process_index=i, process_count=2, progress=False)
             for i in range(2)]
    assert [len(h.converted) for h in hosts] == [2, 1]  # shards 0, 2 and shard 1
    assert _bytes(hosts[0].paths) == _bytes(grouped.paths)
    assert set(_records(grouped.paths)) == set(_records(one_worker.paths))
    assert sum(h.stats["written"] for h in hosts) == one_worker.stats["written"]


def test_bad_arguments_are_clear_errors(inputs, tmp_path):
    root, _ = inputs
    pattern = str(root / "part-*.tar")
    with pytest.raises(DataError, match="--num_shards 9 is more than the 7 input"):
        tools.convert_shards(pattern, str(tmp_path / "x"), num_shards=9, progress=False)
    with pytest.raises(DataError, match="--process_id 2"):
        tools.convert_shards(pattern, str(tmp_path / "x"), process_index=2, process_count=2)
    with pytest.raises(DataError, match="path prefix"):
        tools.convert_shards(pattern, str(tmp_path) + "/", progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    path = _write_inputs(tmp_path / "in", shards=1, per_shard=10)[0]
    data = open(path, "rb").read()
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "00000006.jpg")
    open(path, "wb").write(data[:cut.offset_data + cut.size // 2])  # inside sample 6's image
    report = tools.convert_shards(path, str(tmp_path / "out" / "t"), progress=False)
    # Samples 0-5 are whole (1, 3 and 5 are bad); sample 6, cut in its first member, is lost.
    assert [k for k, *_ in _records(report.paths)] == [f"{i:08d}" for i in (0, 2, 4)]
    assert report.stats["seen"] == 6 and report.stats["skipped"] == 3
    assert report.damaged and report.damaged[0][0] == path


def _convert_cli(repo_root, *args):
    return subprocess.Popen([sys.executable, "-m", "vlm_jax.main", "data", "convert", *args],
                            cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.e2e
def test_killed_conversion_resumes_with_no_duplicate_and_no_gap(repo_root, tmp_path):
    # Shards that take a few tenths of a second each (320 x 240 JPEG decodes).
    _write_inputs(tmp_path / "in", shards=6, per_shard=150, size=(320, 240))
    pattern = str(tmp_path / "in" / "part-*.tar")
    want = tools.convert_shards(pattern, str(tmp_path / "ref" / "train"), progress=False)
    out = tmp_path / "out"
    final = [out / os.path.basename(p) for p in want.paths]

    proc = _convert_cli(repo_root, "--input", pattern, "--output", str(out / "train"))
    deadline = time.monotonic() + 120
    while not any(p.exists() for p in final) and proc.poll() is None:
        assert time.monotonic() < deadline, "no output shard finished in 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = [p for p in final if p.exists()]
    assert 1 <= len(done) < len(final), "the conversion was not interrupted midway"
    for p in done:  # A file under a final name is complete: the reference's bytes.
        assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes(), p.name

    proc = _convert_cli(repo_root, "--input", pattern, "--output", str(out / "train"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"{len(final) - len(done)} converted now, {len(done)} already complete" in stdout
    assert _bytes(final) == _bytes(want.paths)
    got = _records([str(p) for p in final])
    assert len(got) == len(set(got)) == want.stats["written"]  # no duplicate, no gap
    assert sorted(os.listdir(out)) == sorted(p.name for p in final)  # no temporary file left


def test_conversion_to_gcs_reads_back_like_local(gcs_emulator, inputs, one_worker):
    bucket = gcs_emulator.create_bucket("vlm-convert")
    root, _ = inputs
    prefix = f"{bucket}/records/train"
    report = tools.convert_shards(str(root / "part-*.tar"), prefix, workers=2, progress=False)
    assert report.paths == [f"{bucket}/records/{os.path.basename(p)}" for p in one_worker.paths]
    assert _bytes(report.paths) == _bytes(one_worker.paths)
    # Read back by the training source (array_record's own GCS client), like the local shards.
    assert _records(f"{bucket}/records/train-*.array_record") == _records(one_worker.paths)
    import gcsfs  # pylint: disable=import-outside-toplevel

    gcs = gcsfs.GCSFileSystem()
    assert sorted(gcs.ls(f"{bucket}/records")) == sorted(p[5:] for p in report.paths)
    generations = {p: gcs.info(p)["generation"] for p in report.paths}
    # Resumption on gs://: the finished objects are kept (not rewritten), a missing one redone.
    gcs.rm(report.paths[2])
    again = tools.convert_shards(str(root / "part-*.tar"), prefix, workers=2, progress=False)
    assert again.converted == [report.paths[2]] and len(again.already_done) == 6
    assert again.workers == 1  # one shard to do: no pool
    assert all(gcs.info(p)["generation"] == generations[p] for p in report.paths
               if p != report.paths[2])
    assert _bytes(report.paths) == _bytes(one_worker.paths)
    with pytest.raises(DataError, match="bucket gs://no-such-bucket-vlm does not exist"):
        tools.convert_shards(str(root / "part-*.tar"), "gs://no-such-bucket-vlm/r/train",
                             progress=False)
    staging = os.path.join(tempfile.gettempdir(), "vlm_jax_array_record")
    assert not any("train-00002-of-00007.array_record.tmp" in n
                   for n in (os.listdir(staging) if os.path.isdir(staging) else []))
