"""Resuming a checkpoint on a different number of processes (the data stream is re-mapped).

Pipeline level (no subprocess): the per-process states saved by ``m`` iterators, restored
through the checkpoint's data handler onto ``n`` iterators, make those yield exactly the global
batches an iterator that ran from the start yields next, for every pipeline kind.
End to end (``python -m vlm_jax.launch_local``, 8 devices in all): checkpoints of 2 processes
resume on 1 and on 4, one of 1 process on 2, with the losses of an uninterrupted run.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from input_pipeline import interleaved, pipeline, sources
from input_pipeline.shapes import builder as shapes_builder
from input_pipeline.tokenizers import SentencePieceTokenizer
from tests.data_fixtures import tiny_data_dir  # noqa: F401
from tests.runs import train_losses_per_run
from tests.test_sources import _image_bytes, _tar_dataset, write_shard
from vlm_jax.checkpoint import CheckpointError, DataIteratorHandler, DataRestore, DataSave

IMG, EOC = 512, 513


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):  # noqa: F811
    return SentencePieceTokenizer(str(shapes_builder.tokenizer_path(tiny_data_dir)),
                                  context_length=16)


def _parse_flags():
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (as vlm_jax.main does)
        flags.FLAGS(sys.argv[:1], known_only=True)


def _makers(kind, tiny_data_dir, shapes_data_dir, tokenizer,  # noqa: F811
            tmp_path, worker_count=0):
    """``make(process_index, process_count)`` -> a fresh training iterator of ``kind``."""
    if worker_count:
        _parse_flags()
    common = dict(global_batch_size=8, worker_count=worker_count)
    if kind == "tfds":
        return lambda i, n: pipeline.create_train_iterator(
            data_dir=tiny_data_dir, seed=1, context_length=16, process_index=i,
            process_count=n, **common)
    if kind in ("webdataset", "array_record", "mixture"):
        src = _tar_dataset(tmp_path, 40)
        if kind == "array_record":
            paths = sources.write_array_record((src[j] for j in range(len(src))),
                                               str(tmp_path / "ar" / "train"), num_shards=2)
            src = sources.ArrayRecordSource(paths)
        if kind == "mixture":
            samples = [(f"b{j:04d}", {"png": _image_bytes(100 + j), "txt": b"a red circle."})
                       for j in range(24)]
            write_shard(tmp_path / "b.tar", samples)
            src = [(src, 3.0), (sources.WebDatasetSource(str(tmp_path / "b.tar")), 1.0)]
        return lambda i, n: pipeline.create_pair_iterator(
            src, tokenizer=tokenizer, seed=2, image_size=16, process_index=i, process_count=n,
            **common)
    kw = dict(data_dir=shapes_data_dir, config_name="32px", seed=3, max_length=64,
              tokenizer=interleaved.lm_tokenizer(64))
    if kind == "lm_documents":
        kw.update(docs_per_row=2)
    else:  # flamingo_documents
        kw.update(image_id=IMG, eoc_id=EOC, image_size=32, max_images=3)
    return lambda i, n: interleaved.create_document_iterator(process_index=i, process_count=n,
                                                             **kw, **common)


def _merge(parts):
    """The global batch from the per-process batches: process ``i`` of ``n`` holds rows
    ``i, i + n, ...`` of it (positions ``p % n == i`` of the stream)."""
    out = {}
    for key in parts[0]:
        rows = np.empty((sum(len(p[key]) for p in parts),) + parts[0][key].shape[1:],
                        parts[0][key].dtype)
        for i, p in enumerate(parts):
            rows[i::len(parts)] = p[key]
        out[key] = rows
    return out


def _save(directory, iterators):
    directory.mkdir(parents=True)
    for it in iterators:
        DataIteratorHandler().save(directory, args=DataSave(it))


def _restore(directory, it, step):
    return DataIteratorHandler().restore(directory, args=DataRestore(it, step))


# (pipeline, processes that saved, processes that resume, grain workers per process)
CASES = [("tfds", 2, 1, 0), ("tfds", 1, 2, 0), ("tfds", 2, 4, 0), ("webdataset", 2, 1, 0),
         ("webdataset", 1, 2, 0), ("array_record", 2, 1, 0), ("mixture", 1, 2, 0),
         ("lm_documents", 2, 1, 0), ("lm_documents", 1, 2, 1), ("flamingo_documents", 1, 2, 0),
         ("flamingo_documents", 2, 1, 0)]


@pytest.mark.parametrize("kind,saved,resumed,workers", CASES)
def test_remapped_state_continues_the_global_stream(kind, saved, resumed, workers,
                                                    tiny_data_dir,  # noqa: F811
                                                    shapes_data_dir, tokenizer, tmp_path):
    make = _makers(kind, tiny_data_dir, shapes_data_dir, tokenizer, tmp_path, workers)
    steps, more = 3, 3
    reference = make(0, 1)  # ran from the start, never checkpointed
    want = [next(reference) for _ in range(steps + more)][steps:]
    writers = [make(i, saved) for i in range(saved)]
    for it in writers:
        for _ in range(steps):
            next(it)
    _save(tmp_path / "data", writers)
    readers = [_restore(tmp_path / "data", make(i, resumed), steps) for i in range(resumed)]
    for t in range(more):
        got = _merge([next(it) for it in readers])
        assert sorted(got) == sorted(want[t]), kind
        for key in want[t]:
            np.testing.assert_array_equal(got[key], want[t][key], err_msg=f"{kind} {t} {key}")
    if workers:  # (grain workers take seconds to start; the rest is checked without them)
        for it in writers + readers + [reference]:
            it.close()
        return
    # A re-mapped iterator saves a state that restores exactly on its own process count.
    again = [make(i, resumed) for i in range(resumed)]
    states = [it.get_state() for it in readers]
    want_next = _merge([next(it) for it in readers])
    for it, state in zip(again, states):
        it.set_state(state)
    got = _merge([next(it) for it in again])
    for key in want_next:
        np.testing.assert_array_equal(got[key], want_next[key])
    for it in writers + readers + again + [reference]:
        it.close()


def test_missing_process_file_is_remapped_from_the_others(tiny_data_dir,  # noqa: F811
                                                          shapes_data_dir, tokenizer, tmp_path):
    make = _makers("tfds", tiny_data_dir, shapes_data_dir, tokenizer, tmp_path)
    reference = make(0, 1)
    want = [next(reference) for _ in range(3)][2]
    writers = [make(i, 2) for i in range(2)]
    for it in writers:
        for _ in range(2):
            next(it)
    _save(tmp_path / "data", writers)
    (tmp_path / "data" / "process_1-of-2.json").unlink()
    readers = [_restore(tmp_path / "data", make(i, 2), 2) for i in range(2)]
    np.testing.assert_array_equal(_merge([next(it) for it in readers])["text"], want["text"])


def test_stream_with_skipped_samples_is_not_remapped(tmp_path, tokenizer):
    src = _tar_dataset(tmp_path, 40, bad_every=5)  # 8 of 40 samples have an empty caption

    def make(i, n):
        return pipeline.create_pair_iterator(src, tokenizer=tokenizer, global_batch_size=4,
                                             seed=3, image_size=16, process_index=i,
                                             process_count=n)

    writers = [make(i, 2) for i in range(2)]
    for it in writers:
        for _ in range(4):  # 16 positions: some bad samples among them were skipped
            next(it)
    _save(tmp_path / "data", writers)
    skipped = [it.get_state()["next_position"] - 16 - i for i, it in enumerate(writers)]
    assert any(skipped), skipped
    with pytest.raises(CheckpointError, match=r"skipped bad samples before step 4 .*Resume "
                                              r"with 2 processes"):
        _restore(tmp_path / "data", make(0, 1), 4)
    # On the process count that wrote it, each process's own state restores exactly.
    want = [next(it)["text"] for it in writers]
    for i in range(2):
        np.testing.assert_array_equal(next(_restore(tmp_path / "data", make(i, 2), 4))["text"],
                                      want[i])


def test_pair_stream_with_grain_workers_is_not_remapped(tmp_path, tokenizer):
    _parse_flags()
    src = _tar_dataset(tmp_path, 40)
    writer = pipeline.create_pair_iterator(src, tokenizer=tokenizer, global_batch_size=4, seed=3,
                                           image_size=16, process_index=0, process_count=1,
                                           worker_count=1)
    _save(tmp_path / "data", [writer])
    writer.close()
    reader = pipeline.create_pair_iterator(src, tokenizer=tokenizer, global_batch_size=4, seed=3,
                                           image_size=16, process_index=0, process_count=2)
    with pytest.raises(CheckpointError, match=r"worker_count > 0.*Resume with 1 processes"):
        _restore(tmp_path / "data", reader, 0)


def test_state_without_position_is_not_remapped(tiny_data_dir,  # noqa: F811
                                                shapes_data_dir, tokenizer, tmp_path):
    """A file with grain's state only (as checkpoints held before positions were recorded)
    restores on its own process count, and names the count to use on another."""
    make = _makers("tfds", tiny_data_dir, shapes_data_dir, tokenizer, tmp_path)
    directory = tmp_path / "data"
    directory.mkdir()
    plain = make(0, 2)
    for _ in range(2):
        next(plain)
    (directory / "process_0-of-2.json").write_text(json.dumps(plain.get_state()["iterator"]))
    resumed = _restore(directory, make(0, 2), 2)
    np.testing.assert_array_equal(next(resumed)["text"], next(plain)["text"])
    assert resumed.get_state()["position"] == 3 * 8
    with pytest.raises(CheckpointError, match=r"before checkpoints recorded .* \(2\)"):
        _restore(directory, make(0, 1), 2)


# --- end to end ---------------------------------------------------------------------------------

_losses = train_losses_per_run


TOTAL = 9  # steps; checkpoints every 3


def _launch(repo_root, shapes_data_dir, workdir, num_processes):
    args = ["train", "--config", str(repo_root / "experiments/clip_tiny.py") + ":test",
            "--workdir", str(workdir), f"--config.data.data_dir={shapes_data_dir}",
            "--config.log_every_steps=1", "--config.checkpoint.every_steps=3",
            "--config.checkpoint.async_save=false",
            f"--config.total_steps={TOTAL}"]
    cmd = [sys.executable, "-m", "vlm_jax.launch_local", "--num_processes", str(num_processes),
           "--devices_per_process", str(8 // num_processes), "--timeout", "500", "--", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def reference_run(repo_root, shapes_data_dir, tmp_path_factory):
    """The uninterrupted run: 2 processes x 4 devices, 9 steps, checkpoints at 3, 6 and 9."""
    workdir = tmp_path_factory.mktemp("elastic") / "reference"
    _launch(repo_root, shapes_data_dir, workdir, 2)
    return workdir


def _resume(source, step, count, workdir, repo_root, shapes_data_dir):
    """Copies ``source`` (checkpoints up to ``step``, and its log) to ``workdir`` and resumes it
    on ``count`` processes until the end."""
    shutil.copytree(source, workdir)
    for later in (workdir / "checkpoints").iterdir():
        if later.name.isdigit() and int(later.name) > step:
            shutil.rmtree(later)
    proc = _launch(repo_root, shapes_data_dir, workdir, count)
    assert f"Resuming from checkpoint step {step}" in proc.stdout
    saved = len(list((workdir / "checkpoints" / str(step) / "data").glob("process_*.json")))
    assert saved != count
    assert f"checkpoint written by {saved} process(es), resumed on {count}" in proc.stdout
    # The resumed run's own checkpoints are written by the new process count.
    data = workdir / "checkpoints" / str(TOTAL) / "data"
    assert sorted(p.name for p in data.glob("process_*")) == [f"process_{i}-of-{count}.json"
                                                              for i in range(count)]
    return workdir


@pytest.fixture(scope="module")
def resumed_on_one(reference_run, repo_root, shapes_data_dir):
    """The reference run's step-3 checkpoint (2 processes) resumed on 1 process."""
    return _resume(reference_run, 3, 1, reference_run.parent / "on_one", repo_root,
                   shapes_data_dir)


def _compare(workdir, reference_run, step, what):
    """Losses after resuming at ``step`` equal the uninterrupted run's (printed as traces)."""
    ref, got = _losses(reference_run), _losses(workdir)
    print(f"\n{what}, resumed at step {step} (train/loss; uninterrupted run vs resumed run):")
    for s in range(1, TOTAL + 1):
        print(f"  step {s}: {ref[s][0]:.7f}  {got[s][-1]:.7f}" + ("  (after resume)" if s > step
                                                               else ""))
    assert sorted(got) == list(range(1, TOTAL + 1))
    for s in range(step + 1, TOTAL + 1):
        assert len(got[s]) >= 2, got  # logged by the source run and by the resumed run
        assert got[s][-1] == pytest.approx(ref[s][0], abs=1e-5), (s, got, ref)
    assert len({round(ref[s][0], 4) for s in range(step, TOTAL + 1)}) == TOTAL + 1 - step


@pytest.mark.e2e
def test_two_process_checkpoint_resumes_on_one(resumed_on_one, reference_run):
    _compare(resumed_on_one, reference_run, 3, "2 -> 1 processes")


@pytest.mark.e2e
@pytest.mark.slow  # 4 processes on 2 cores; 2 -> 1 and 1 -> 2 run in the default suite.
def test_two_process_checkpoint_resumes_on_four(reference_run, repo_root, shapes_data_dir):
    workdir = _resume(reference_run, 3, 4, reference_run.parent / "on_four", repo_root,
                      shapes_data_dir)
    _compare(workdir, reference_run, 3, "2 -> 4 processes")


@pytest.mark.e2e
def test_one_process_checkpoint_resumes_on_two(resumed_on_one, reference_run, repo_root,
                                               shapes_data_dir):
    """Step 6 of the run resumed on 1 process was written by 1 process: resumed on 2."""
    workdir = _resume(resumed_on_one, 6, 2, reference_run.parent / "one_to_two", repo_root,
                      shapes_data_dir)
    _compare(workdir, reference_run, 6, "1 -> 2 processes")
