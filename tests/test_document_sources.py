"""Documents without shapes: the language model on TFDS / JSON Lines / ArrayRecord text, Flamingo on
OBELICS- and MMC4-layout webdataset tars. Batches are compared with references built here from
the documents (sentencepiece called directly, the documented token layout), not with the
pipeline's own output."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
from PIL import Image

from input_pipeline import interleaved, text
from input_pipeline.transforms import SKIP_STATS
from vlm_jax import config as config_lib
from vlm_jax.families import get_family

BOS, EOS, IMG, EOC = 2, 3, 512, 513  # flamingo_tiny_shapes: <image> / <|endofchunk|> after 512
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=interleaved.LM_TOKENIZER_PATH)


def _doc(i: int) -> str:
    words = [f"a {COLOURS[(i + k) % 6]} {SHAPES[(i * 3 + k) % 4]}" for k in range(1 + i % 4)]
    return " left of ".join(words) + f" near a {SHAPES[i % 4]} and a {SHAPES[i // 4 % 4]}"


DOCS = [_doc(i) for i in range(14)]
HELD_OUT = [_doc(100 + i) for i in range(5)]


def _data(config):
    """The run's training data, as train prepares it (the model's family)."""
    return get_family(config).make_data(config)


def _config(experiment, *overrides):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return config_lib.load_config(os.path.join(repo, "experiments", f"{experiment}:test"),
                                  [o.removeprefix("--config.") for o in overrides])


def _write_jsonl(path, docs, bad=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
            if bad and i == 3:
                f.write("{not json\n\n")  # a broken line, then a blank one (not a document)
            if bad and i == 7:
                f.write(json.dumps({"url": "x"}) + "\n")  # no text field
    return str(path)


def _write_array_record(path, docs):
    from array_record.python import array_record_module  # pylint: disable=C0415

    w = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for d in docs:
        w.write(d.encode("utf-8"))
    w.close()
    return str(path)


class VlmTestTextCorpus(tfds.core.GeneratorBasedBuilder):
    """A TFDS text dataset: DOCS (train) and HELD_OUT (test)."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download (and no checksum-file lookup)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "id": tfds.features.Scalar(np.int64)}),
            disable_shuffling=True)  # records in generation order (the held-out check)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(DOCS),
                "test": self._generate_examples(HELD_OUT)}

    def _generate_examples(self, docs):
        for i, d in enumerate(docs):
            yield i, {"text": d, "id": i}


def _write_tfds(data_dir):
    VlmTestTextCorpus(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return str(data_dir)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """One corpus (DOCS train, HELD_OUT eval) in each text format."""
    root = tmp_path_factory.mktemp("corpora")
    return {
        "jsonl": dict(train_files=_write_jsonl(root / "train.jsonl", DOCS),
                      eval_files=_write_jsonl(root / "eval.jsonl", HELD_OUT, bad=False)),
        "array_record": dict(train_files=_write_array_record(root / "train.array_record", DOCS),
                             eval_files=_write_array_record(root / "eval.array_record",
                                                            HELD_OUT)),
        "tfds": dict(train_files="vlm_test_text_corpus@train",
                     eval_files="vlm_test_text_corpus@test", data_dir=_write_tfds(root / "tfds")),
    }


def _ref_row(sp, docs, length):
    """tokens, weights of one row: [bos] pieces [eos] of each document, cut, padded."""
    ids, w = [], []
    for d in docs:
        pieces = sp.encode(d)
        ids += [BOS, *pieces, EOS]
        w += [0.0] + [1.0] * (len(pieces) + 1)
    ids, w = ids[:length], w[:length]
    return ids + [0] * (length - len(ids)), w + [0.0] * (length - len(w))


def _lm_data(kind, corpora, *overrides):
    c = corpora[kind]
    return _data(_config(
        "lm_tiny_shapes.py", f"--config.data.name={kind}",
        f"--config.data.train_files={c['train_files']}",
        f"--config.data.eval_files={c['eval_files']}", "--config.evals.lm_loss.dataset=eval_files",
        f"--config.data.data_dir={c.get('data_dir', '')}", *overrides))


@pytest.mark.parametrize("kind", ["jsonl", "array_record", "tfds"])
def test_lm_rows_are_the_documents_tokenised(kind, corpora, sp):
    """One epoch, one document per row: every document once, tokenised as sentencepiece does;
    the jsonl's broken lines are skipped documents (empty rows), counted with their reason."""
    SKIP_STATS.reset()
    data = _lm_data(kind, corpora, "--config.data.docs_per_row=1", "--config.batch_size=8",
                    "--config.data.seq_length=24")
    n_rows = len(data.source)  # 16 for the jsonl (two broken lines), else 14
    it = data.train_iterator()
    rows = []
    while len(rows) < 16:
        batch = next(it)
        assert batch["tokens"].dtype == np.int32 and batch["weights"].dtype == np.float32
        assert set(batch) == {"tokens", "weights"} and batch["tokens"].shape == (8, 24)
        rows += list(zip(batch["tokens"].tolist(), batch["weights"].tolist()))
    refs = {tuple(_ref_row(sp, [d], 24)[0]): _ref_row(sp, [d], 24)[1] for d in DOCS}
    got = [r for r in rows[:n_rows] if any(r[0])]
    assert sorted(tuple(t) for t, _ in got) == sorted(refs)  # each document exactly once
    for t, w in got:
        assert w == refs[tuple(t)]
    if kind == "jsonl":
        assert n_rows == 16 and sum(not any(t) for t, _ in rows[:16]) == 2
        stats = SKIP_STATS.snapshot()
        assert stats["skipped/bad_json"] >= 1 and stats["skipped/missing_text"] >= 1
    # Held-out rows: the eval documents in file order.
    held = data.held_out_text("config.evals.lm_loss", 256)
    want = [_ref_row(sp, [d], 24) for d in HELD_OUT]
    assert held["documents"].tolist() == [t for t, _ in want]
    assert held["weights"].tolist() == [w for _, w in want]


def test_packed_rows_and_resume_on_another_process_count(corpora, sp, tmp_path):
    """docs_per_row=3: a row is 3 consecutive documents of the stream, cut at seq_length; the
    global batches of 2 processes are those of 1, and 2 processes resume exactly from the
    position 1 process reached."""
    source = text.JsonlTextSource(_write_jsonl(tmp_path / "clean.jsonl", DOCS, bad=False))
    tok = interleaved.lm_tokenizer(64)
    kw = dict(tokenizer=tok, seq_length=40, global_batch_size=4, seed=5, docs_per_row=3)
    one = text.create_text_iterator(source, **kw)
    first = next(one)
    state = one.get_state()  # what a checkpoint stores: restored exactly on the same process
    second = next(one)
    restored = text.create_text_iterator(source, **kw)
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored)["tokens"], second["tokens"])
    docs = set(DOCS)
    for row in first["tokens"].tolist():  # parse the row back into whole documents
        pos, found = 0, 0
        while pos < 40 and row[pos] == BOS:
            match = [d for d in docs if row[pos:pos + len(sp.encode(d)) + 2]
                     == [BOS, *sp.encode(d), EOS][:40 - pos]]
            assert match, row
            pos += len(sp.encode(match[0])) + 2
            found += 1
        assert found == 3 or (found < 3 and pos >= 40), row
    for processes, start in ((2, 0), (2, 4), (4, 4)):
        parts = []
        for i in range(processes):
            it = text.create_text_iterator(source, process_index=i, process_count=processes, **kw)
            it.seek(start)
            parts.append(next(it))
        want = first if start == 0 else second
        for key in ("tokens", "weights"):
            merged = np.empty_like(want[key])
            for i in range(processes):
                merged[i::processes] = parts[i][key]
            np.testing.assert_array_equal(merged, want[key])


# -------------------------------------------------------------------------------------------
# Flamingo: interleaved documents in webdataset tars.
# -------------------------------------------------------------------------------------------

def _png(colour, size=(40, 30)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def _colour(doc, k):
    return (10 + 9 * doc, 40 * k + 20, 200 - 7 * doc)


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _obelics(doc):
    """OBELICS layout: texts / images lists; images as members <key>.<i>.png (i: position)."""
    n_img = 1 + doc % 3
    texts, images, members, expect = [], [], {}, []  # expect: texts and image colours in order
    if doc % 2:
        texts.append(f"intro {_doc(doc)}")
        images.append(None)
        expect.append(texts[-1])
    for k in range(n_img):
        images.append(f"https://example.com/{doc}/{k}.png")
        texts.append(None)
        members[f"{len(images) - 1}.png"] = _png(_colour(doc, k))
        expect.append(_colour(doc, k))
        texts.append(_doc(doc + k))
        images.append(None)
        expect.append(texts[-1])
    return {"texts": texts, "images": images, "metadata": "[]"}, members, expect


def _mmc4(doc):
    """MMC4 layout: text_list + image_info (matched_text_index), members by image_name; image
    info listed in reverse sentence order, one image below min_image_similarity."""
    sentences = [_doc(doc + k) for k in range(3)]
    info, members = [], {}
    for k, j in enumerate((2, 0)):
        info.append({"image_name": f"img{k}.png", "matched_text_index": j, "matched_sim": 0.3,
                     "raw_url": f"https://example.com/{doc}/{k}.png"})
        members[f"img{k}.png"] = _png(_colour(doc, k))
    info.append({"image_name": "low.png", "matched_text_index": 1, "matched_sim": 0.05})
    members["low.png"] = _png((0, 0, 0))
    expect = [_colour(doc, 1), sentences[0], sentences[1], _colour(doc, 0), sentences[2]]
    return {"text_list": sentences, "image_info": info}, members, expect


def _ref_doc(sp, expect, length=48, max_images=5):
    """The documented layout, written out: (tokens, weights, image colours)."""
    ids, w, colours, is_open = [BOS], [0.0], [], False
    for item in expect:
        if isinstance(item, str):
            p = sp.encode(item)
            ids, w = ids + p, w + [1.0] * len(p)
            continue
        if len(colours) == max_images:
            break
        if is_open:
            ids, w = ids + [EOC], w + [1.0]
        ids, w, is_open = ids + [IMG], w + [0.0], True
        colours.append(item)
    if is_open:
        ids, w = ids + [EOC], w + [1.0]
    ids, w = (ids + [EOS])[:length], (w + [1.0])[:length]
    while ids[-1] == IMG:
        ids, w = ids[:-1], w[:-1]
    colours = colours[:ids.count(IMG)]
    return ids + [0] * (length - len(ids)), w + [0.0] * (length - len(w)), colours


@pytest.fixture(scope="module")
def web_docs(tmp_path_factory):
    """Two shards: 8 OBELICS documents (one with a corrupt image member, kept without it, one
    whose json is broken, one whose only image is missing) and 8 MMC4 documents."""
    root = tmp_path_factory.mktemp("web_docs")
    expected = {}
    with tarfile.open(root / "obelics-00000.tar", "w") as tar:
        for d in range(10):
            doc, members, expect = _obelics(d)
            if d == 4:  # its second image does not decode: dropped, the document kept
                members["2.png"] = b"\x89PNG garbage"
                expect = [e for e in expect if e != _colour(4, 1)]
            payload = json.dumps(doc).encode()
            if d == 6:
                payload = payload[:-5]  # truncated json: the document is skipped
            if d == 8:
                doc = {"texts": ["only text", None], "images": [None, "gone.jpg"]}
                payload, members = json.dumps(doc).encode(), {}  # its image was never fetched
            _add(tar, f"doc{d:03d}.json", payload)
            for name, data in members.items():
                _add(tar, f"doc{d:03d}.{name}", data)
            if d not in (6, 8):
                expected[f"obelics{d}"] = expect
    with tarfile.open(root / "mmc4-00000.tar", "w") as tar:
        for d in range(10, 18):
            doc, members, expect = _mmc4(d)
            _add(tar, f"m{d:03d}.json", json.dumps(doc).encode())
            for name, data in members.items():
                _add(tar, f"m{d:03d}.{name}", data)
            expected[f"mmc4{d}"] = expect
    return f"{root}/obelics-00000.tar,{root}/mmc4-*.tar", expected  # a list and a glob


def _flamingo_config(files, *overrides):
    return _config("flamingo_tiny_shapes.py", "--config.data.name=webdataset",
                   f"--config.data.train_files={files}", "--config.data.min_image_similarity=0.2",
                   "--config.evals={}", *overrides)


def test_flamingo_batches_match_the_documents(web_docs, sp):
    files, expected = web_docs
    SKIP_STATS.reset()
    data = _data(_flamingo_config(files, "--config.batch_size=8"))
    it = data.train_iterator()
    rows = []
    for _ in range(2):  # 16 usable documents of 18: one epoch
        b = next(it)
        assert b["images"].shape == (8, 5, 32, 32, 3) and b["images"].dtype == np.uint8
        assert b["tokens"].shape == b["weights"].shape == (8, 48)
        rows += [(b["tokens"][i].tolist(), b["weights"][i].tolist(), b["images"][i])
                 for i in range(8)]
    refs = {name: _ref_doc(sp, expect) for name, expect in expected.items()}
    matched = set()
    for tokens, weights, images in rows:
        names = [n for n, r in refs.items() if r[0] == tokens and n not in matched]
        assert names, f"row {tokens} is no expected document"
        ref = refs[names[0]]
        matched.add(names[0])
        assert weights == ref[1]
        n = len(ref[2])
        assert n == tokens.count(IMG) >= 1
        for k, colour in enumerate(ref[2]):  # images in <image> order, resized to 32
            np.testing.assert_array_equal(images[k], np.broadcast_to(colour, (32, 32, 3)))
        assert not images[n:].any()
    assert matched == set(refs)  # every usable document once
    stats = SKIP_STATS.snapshot()
    assert stats["skipped/bad_json"] >= 1 and stats["skipped/no_images"] >= 1
    assert stats["dropped_images/corrupt_image"] >= 1
    assert "dropped_images/missing_image" in stats


def test_document_cut_at_max_images_and_max_length(sp):
    items = ["intro", *sum(([(k, f"{k}.png", None), _doc(k)] for k in range(7)), [])]
    ids, weights, images = interleaved.interleaved_ids(
        items, interleaved.lm_tokenizer(64), 200, 5, image_id=IMG, eoc_id=EOC)
    assert ids.count(IMG) == len(images) == 5 and ids[-2:] == [EOC, EOS]
    intro = [BOS, *sp.encode("intro")]
    for room, want, n_images in ((1, intro, 0), (2, intro + [IMG, sp.encode(_doc(0))[0]], 1)):
        cut, w, images = interleaved.interleaved_ids(  # cut after <image>: it goes too
            items, interleaved.lm_tokenizer(64), len(intro) + room, 5, image_id=IMG,
            eoc_id=EOC)
        assert cut == want and len(images) == n_images and w == [0.0, 1, 1, 1, 0, 1][:len(cut)]


def test_web_document_stream_on_another_process_count(web_docs):
    """Without skipped documents (the MMC4 shard), the global batches of 2 processes are those
    of 1, and 2 processes resume exactly where 1 process stopped."""
    source = interleaved.WebDatasetDocumentSource(web_docs[0].split(",")[1])
    kw = dict(tokenizer=interleaved.lm_tokenizer(48), max_length=48, max_images=5,
              image_id=IMG, eoc_id=EOC, image_size=16, global_batch_size=4, seed=1)
    one = interleaved.create_webdataset_document_iterator(source, **kw)
    want = [next(one), next(one)]
    for start in (0, 4):
        parts = []
        for i in range(2):
            it = interleaved.create_webdataset_document_iterator(
                source, process_index=i, process_count=2, **kw)
            it.seek(start)
            parts.append(next(it))
        for key in ("tokens", "weights", "images"):
            merged = np.empty_like(want[0][key])
            merged[0::2], merged[1::2] = parts[0][key], parts[1][key]
            np.testing.assert_array_equal(merged, want[start // 4][key])


def test_jsonl_and_web_documents_on_gcs_read_like_local(gcs_emulator, corpora, web_docs):
    """JSON Lines and document tars on gs:// (a GCS emulator; a brace range, ranged reads) give
    the batches of the local files."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    bucket = gcs_emulator.create_bucket("vlm-documents")
    local_jsonl = corpora["jsonl"]["train_files"]
    epath.Path(local_jsonl).copy(epath.Path(f"{bucket}/text/train-00000.jsonl"))
    epath.Path(local_jsonl).copy(epath.Path(f"{bucket}/text/train-00001.jsonl"))
    # Read record by record (no grain reader threads left reading when the emulator stops).
    got = text.JsonlTextSource(f"{bucket}/text/train-{{00000..00001}}.jsonl")
    want = text.JsonlTextSource([local_jsonl, local_jsonl])
    assert len(got) == len(want) == 32
    assert [got[i] for i in range(32)] == [want[i] for i in range(32)]

    local_tar = web_docs[0].split(",")[0]
    epath.Path(local_tar).copy(epath.Path(f"{bucket}/docs/obelics-00000.tar"))
    got = interleaved.WebDatasetDocumentSource(f"{bucket}/docs/obelics-*.tar")
    want = interleaved.WebDatasetDocumentSource(local_tar)
    decode = interleaved.DecodeDocument(interleaved.lm_tokenizer(48), 48, 5, image_id=IMG,
                                        eoc_id=EOC, image_size=16)
    assert len(got) == len(want) == 10
    for i in range(10):  # json and image members by ranged reads of the gs:// object
        g, w = decode.map(got[i]), decode.map(want[i])
        assert g.keys() == w.keys()
        for key in g:
            np.testing.assert_array_equal(g[key], w[key])


@pytest.mark.parametrize("experiment,overrides,match", [
    ("flamingo_tiny_shapes.py", ["data.name=jsonl", "data.train_files=x.jsonl"],
     "Flamingo trains on interleaved documents"),
    ("lm_tiny_shapes.py", ["data.name=webdataset", "data.train_files=x.tar"],
     "a text corpus"),
    ("lm_tiny_shapes.py", ["data.name=jsonl"], "needs config.data.train_files"),
    ("lm_tiny_shapes.py", ["data.name=jsonl", "data.train_files={train}",
                           "model.eos_id=1"], "bos/eos/pad ids"),
])
def test_config_errors_name_the_key(experiment, overrides, match, corpora):
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

    overrides = [o.format(train=corpora["jsonl"]["train_files"]) for o in overrides]
    with pytest.raises(ConfigError, match=match):
        _data(_config(experiment, *overrides))


def test_lm_loss_needs_held_out_text(corpora):
    from vlm_jax import train  # pylint: disable=import-outside-toplevel
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

    config = _config("lm_tiny_shapes.py", "data.name=jsonl",
                     f"data.train_files={corpora['jsonl']['train_files']}",
                     "evals.lm_loss.dataset=eval_files")
    with pytest.raises(ConfigError, match="config.evals.lm_loss needs held-out text.*"
                                          "config.data.eval_files"):
        train.check_eval_data(config, get_family(config).make_data(config))
    shapes = _config("lm_tiny_shapes.py", "evals.lm_loss.dataset=eval_files")
    with pytest.raises(ConfigError, match="config.evals.lm_loss.dataset='eval_files' reads "
                                          "config.data.eval_files of a text corpus"):
        train.check_eval_data(shapes, get_family(shapes).make_data(shapes))


@pytest.mark.parametrize("kind", ["array_record", "tfds", "webdataset"])
def test_training_runs_on(kind, corpora, web_docs, tmp_path, monkeypatch):
    """A few steps of the train loop on an ArrayRecord text file, a TFDS text dataset (lm_loss
    on its held-out split) and the web documents (Flamingo); shapes is never built."""
    from vlm_jax import train  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_home"))
    common = ("--config.total_steps=2", "--config.data.max_skipped_fraction=0.5")
    if kind == "webdataset":
        config = _flamingo_config(web_docs[0], *common)
    else:
        c = corpora[kind]
        config = _config("lm_tiny_shapes.py", f"--config.data.name={kind}",
                         f"--config.data.train_files={c['train_files']}",
                         f"--config.data.eval_files={c['eval_files']}",
                         "--config.evals.lm_loss.dataset=eval_files",
                         f"--config.data.data_dir={c.get('data_dir', '')}", *common)
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    if kind != "webdataset":
        assert np.isfinite(results["lm_loss/loss"])
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    metrics = [m for m in metrics if "train/loss" in m]  # the train records (not eval's)
    assert np.isfinite(metrics[-1]["train/loss"])
    if kind == "webdataset":  # skipped documents and dropped images are logged
        assert metrics[-1]["data/skipped/bad_json"] >= 1
        assert metrics[-1]["data/dropped_images/corrupt_image"] >= 1
    assert not (tmp_path / "tfds_home").exists()  # the shapes dataset was not built


@pytest.mark.e2e
def test_vlm_jax_train_on_jsonl(corpora, tmp_path):
    """``vlm-jax train --config experiments/lm_tiny_shapes.py:test --config.data.name=jsonl``
    trains and reports lm_loss on the held-out file; shapes is never built."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               TFDS_DATA_DIR=str(tmp_path / "tfds_home"))
    c = corpora["jsonl"]
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_jax.main", "train", "--config",
         os.path.join(repo, "experiments", "lm_tiny_shapes.py:test"), "--workdir",
         str(tmp_path / "run"), "--config.total_steps=2", "--config.data.name=jsonl",
         f"--config.data.train_files={c['train_files']}",
         f"--config.data.eval_files={c['eval_files']}",
         "--config.evals.lm_loss.dataset=eval_files",
         "--config.data.max_skipped_fraction=0.5"],  # 2 of its 16 lines are broken
        capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lm_loss/perplexity |" in proc.stdout
    assert not (tmp_path / "tfds_home").exists()
