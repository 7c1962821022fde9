"""Run outputs on gs:// against a real GCS API (fake-gcs-server on 127.0.0.1, see
tests/gcs_emulator.py): metrics.jsonl across writer lifetimes, TensorBoard events, the PNG plot,
and clear errors for an unreachable endpoint or a missing bucket."""

from __future__ import annotations

import io
import struct
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from tests import gcs_emulator as emu
from vlm_jax import metrics as metrics_lib
from vlm_jax import main as main_lib


def _bucket(gcs_emulator) -> str:
    return gcs_emulator.create_bucket(f"vlm-test-{uuid.uuid4().hex[:10]}")


def _gcsfs():
    import gcsfs  # pylint: disable=import-outside-toplevel

    return gcsfs.GCSFileSystem()  # STORAGE_EMULATOR_HOST: the emulator, anonymous.


def _write_two_lifetimes(workdir) -> None:
    """Two writers one after the other, as a run and its resume."""
    w = metrics_lib.MetricWriter(workdir)
    w.write(1, {"train/loss": 2.5, "train/lr": 0.1, "vector": np.zeros(3)})
    w.write(2, {"train/loss": 2.25, "train/lr": 0.2})
    w.close()
    w = metrics_lib.MetricWriter(workdir)
    w.write(3, {"train/loss": 2.0, "train/lr": 0.3, "eval/zeroshot/top1": 0.5})
    w.close()


def _read_events(data: bytes) -> list:
    """The Event protos of a TFRecord event file, checking each record's framing and CRCs."""
    from tensorboardX.crc32c import crc32c  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

    def masked(x):
        x = crc32c(x) & 0xffffffff
        return (((x >> 15) | (x << 17)) + 0xa282ead8) & 0xffffffff

    events, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[pos + 8:pos + 12])[0] == masked(header)
        body = data[pos + 12:pos + 12 + n]
        assert struct.unpack("I", data[pos + 12 + n:pos + 16 + n])[0] == masked(body)
        events.append(event_pb2.Event.FromString(body))
        pos += 16 + n
    return events


def test_metrics_on_gcs_match_a_local_run(gcs_emulator, tmp_path):
    """metrics.jsonl on gs:// after two writer lifetimes (a resume) holds every line, as the
    local file written the same way does; TensorBoard events are readable; the PNG decodes."""
    bucket = _bucket(gcs_emulator)
    remote, local = f"{bucket}/run", tmp_path / "run"
    _write_two_lifetimes(remote)
    _write_two_lifetimes(local)
    fs = _gcsfs()
    got = fs.cat(f"{remote}/metrics.jsonl").decode()
    want = (local / "metrics.jsonl").read_text()
    print(got)
    assert got == want and [line.count('"step"') for line in got.splitlines()] == [1, 1, 1]
    assert [r["step"] for r in metrics_lib.read_metrics(remote)] == [1, 2, 3]

    files = sorted(fs.ls(f"{remote}/tensorboard"))
    assert len(files) == 2 and all("tfevents" in f for f in files), files
    scalars = {}
    for f in files:
        for e in _read_events(fs.cat(f)):
            for v in e.summary.value:
                scalars[(v.tag, e.step)] = v.simple_value
    assert scalars[("train/loss", 1)] == 2.5 and scalars[("train/loss", 3)] == 2.0
    assert scalars[("eval/zeroshot/top1", 3)] == 0.5 and ("vector", 1) not in scalars

    out = metrics_lib.plot_metrics(remote)
    assert str(out) == f"{remote}/metrics.png"
    png = Image.open(io.BytesIO(fs.cat(f"{remote}/metrics.png")))
    ref = Image.open(metrics_lib.plot_metrics(local))
    assert png.format == "PNG" and png.size == ref.size


def test_event_file_rolls_over_to_a_new_object(gcs_emulator, monkeypatch):
    """Past ROLL_BYTES the events go to a new object that sorts after the first."""
    monkeypatch.setattr(metrics_lib._ObjectRecordWriter, "ROLL_BYTES", 200)  # pylint: disable=protected-access
    remote = f"{_bucket(gcs_emulator)}/run"
    w = metrics_lib.MetricWriter(remote)
    for step in range(1, 11):
        w.write(step, {"train/loss": float(step)})
    w.close()
    fs = _gcsfs()
    files = sorted(fs.ls(f"{remote}/tensorboard"))
    assert len(files) > 1, files
    steps = [e.step for f in files for e in _read_events(fs.cat(f)) if e.summary.value]
    assert steps == list(range(1, 11))


@pytest.mark.parametrize("where", ["missing_bucket", "nothing_listening"])
def test_unreachable_workdir_fails_fast_with_the_fix(gcs_emulator, monkeypatch, capsys, where,
                                                     repo_root):
    """train and eval on a bucket that does not exist, or with no server at the endpoint: a
    ConfigError / CheckpointError naming the path and the fix, in seconds."""
    if where == "nothing_listening":
        env = emu.emulator_env(f"http://127.0.0.1:{emu.free_port()}")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        emu.apply_env({})
        workdir, expect = "gs://vlm-test-any/run", "cannot connect to the storage endpoint"
    else:
        workdir, expect = "gs://vlm-test-no-such-bucket/run", "does not exist"
    config = str(repo_root / "experiments" / "clip_tiny.py") + ":test"
    report = []
    try:
        for argv, kind in ((["train", "--config", config, "--workdir", workdir], "ConfigError"),
                           (["eval", "--workdir", workdir], "ConfigError"),
                           (["eval", "--config", config, "--checkpoint",
                             f"{workdir}/checkpoints/4"], "CheckpointError")):
            t0 = time.perf_counter()
            code = main_lib.main(argv)
            took = time.perf_counter() - t0
            err = capsys.readouterr().err
            report.append(f"{' '.join(argv[:1] + argv[-2:])}: exit {code} in {took:.1f} s: "
                          f"{err.strip()}")
            assert code == 2 and kind in err and workdir in err and expect in err, err
            assert took < 15
    finally:
        with capsys.disabled():
            print("\n" + "\n".join(report))
        monkeypatch.undo()
        emu.apply_env(gcs_emulator.env)


def test_data_tools_write_to_gcs(gcs_emulator, shapes_data_dir, tmp_path):
    """`data export | convert | inspect` with gs:// outputs write what they write locally."""
    from input_pipeline import sources, tools  # pylint: disable=import-outside-toplevel

    bucket, fs = _bucket(gcs_emulator), _gcsfs()
    local = tools.export_webdataset(shapes_data_dir, "shapes", "32px", "validation",
                                    str(tmp_path / "wds"), shard_size=64)
    remote = tools.export_webdataset(shapes_data_dir, "shapes", "32px", "validation",
                                     f"{bucket}/wds", shard_size=64)
    assert remote == [f"{bucket}/wds/validation-{i:05d}.tar" for i in range(2)]
    assert [fs.cat(p) for p in remote] == [open(p, "rb").read() for p in local]
    assert not fs.glob(f"{bucket}/wds/.*tmp*")

    pattern = f"{bucket}/wds/validation-*.tar"
    out = tools.convert_to_array_record(pattern, f"{bucket}/ar/val", num_shards=2)
    ref = tools.convert_to_array_record(str(tmp_path / "wds" / "validation-*.tar"),
                                        str(tmp_path / "ar" / "val"), num_shards=2)
    assert [fs.cat(p) for p in out] == [open(p, "rb").read() for p in ref]

    report = tools.inspect("webdataset", pattern, f"{bucket}/grid.png", max_scan=32)
    assert report["samples"] == len(sources.WebDatasetSource(pattern)) == 128
    assert Image.open(io.BytesIO(fs.cat(f"{bucket}/grid.png"))).format == "PNG"


def test_convert_into_a_gcs_workdir(gcs_emulator, repo_root):
    """`vlm-jax convert --workdir gs://...`: checkpoint 0 (orbax through tensorstore's gcs
    driver) and config.json in the bucket restore to open_clip's embeddings."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from vlm_jax import convert, train  # pylint: disable=import-outside-toplevel
    from vlm_jax.config import load_config, load_json_config  # pylint: disable=import-outside-toplevel

    fixture = repo_root / "tests" / "fixtures" / "open_clip"
    workdir = f"{_bucket(gcs_emulator)}/converted"
    base = load_config(str(repo_root / "experiments" / "clip_tiny.py"))
    # The input in the bucket too (safetensors needs a local file: it is copied to a temp dir).
    _gcsfs().put(str(fixture / "tiny_gelu.safetensors"), f"{workdir}_input/tiny_gelu.safetensors")
    convert.convert(f"{workdir}_input/tiny_gelu.safetensors", workdir, act="gelu",
                    base_config=base)
    with pytest.raises(convert.ConvertError, match="does not exist"):
        convert.convert(f"{workdir}_input/missing.safetensors", f"{workdir}_2", act="gelu",
                        base_config=base)
    config = load_json_config(f"{workdir}/config.json")
    s, params, step = train.restore_for_inference(config, workdir)
    model = nnx.merge(s.graphdef, params)
    ref = np.load(fixture / "tiny_gelu_io.npz")
    img = np.asarray(model.encode_image(jnp.asarray(ref["images_nchw"].transpose(0, 2, 3, 1))))
    assert step == 0
    np.testing.assert_allclose(img, ref["image_embeddings"], atol=1e-4, rtol=0)
    assert {"config.json", "checkpoints"} <= {p.rsplit("/", 1)[-1]
                                              for p in _gcsfs().ls(workdir)}

    # init_from a gs:// run: a fresh model's image tower replaced by the converted one.
    import jax  # pylint: disable=import-outside-toplevel

    with config.unlocked():
        config.init_from = {"image": {"workdir": workdir, "subtree": "image"}}
    fresh = s.init_fn()["params"]
    loaded = train.load_pretrained(config, s, fresh)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        loaded["image"], params["image"])
    assert all(jax.tree.leaves(same))
    assert not all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), fresh["image"],
        params["image"])))
