"""``vlm_jax.load``: the README's Python API snippet on a converted open_clip model folder and on
runs trained by the loop, against references that are not the API.

* Converted (``vlm-jax convert`` of ``tests/fixtures/open_clip/hub_tiny``, an open_clip hub
  folder): open_clip's own pipeline through that folder (its eval transform on images of other
  sizes, its tokenizer on raw strings, its model), from ``hub_tiny_io.npz``
  (``make_hub_fixture.py``): within 1e-5 in float32, where bfloat16 misses.
* Trained (``experiments/coca_tiny_shapes.py:test``, trained here by ``train_and_evaluate``;
  CoCa has CLIP's ``embed`` capability and captions as well): ``vlm-jax eval``'s feature
  extraction (``FeatureExtractor`` on ``restore_for_inference``, tokens from ``data.prepare``'s
  tokenizer) within 1e-6, and ``vlm-jax caption``'s captions.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import vlm_jax
from vlm_jax import config as config_lib
from vlm_jax import main as main_lib
from vlm_jax import train
from vlm_jax.evaluators.common import FeatureExtractor

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "open_clip"


def _snippet() -> str:
    """The README's Python API code block."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_snippet(workdir, coca_workdir, images: list[pathlib.Path]) -> dict:
    code = (_snippet().replace('"runs/laion_b32"', repr(str(workdir)))
            .replace('"runs/coca_tiny"', repr(str(coca_workdir)))
            .replace('"cat.jpg"', repr(str(images[0])))
            .replace('"dog.jpg"', repr(str(images[1]))))
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # pylint: disable=exec-used
    return namespace


def _write_images(directory: pathlib.Path, arrays) -> list[pathlib.Path]:
    directory.mkdir(exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(directory / f"im{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def hub_io():
    return np.load(FIXTURE / "hub_tiny_io.npz")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``vlm-jax convert --input hub_tiny/`` (no --act: open_clip_config.json says it)."""
    workdir = tmp_path_factory.mktemp("api") / "converted"
    assert main_lib.main(["convert", "--input", str(FIXTURE / "hub_tiny"), "--workdir",
                          str(workdir)]) == 0
    return workdir


def _trained(tmp_path_factory, data_dir, spec):
    config = config_lib.load_config(str(ROOT / spec), [f"data.data_dir={data_dir}"])
    with config.unlocked():
        for entry in config.evals.values():
            entry.every_steps = -1  # No evaluation at the end: only the checkpoint matters.
    workdir = tmp_path_factory.mktemp("api") / "run"
    train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_data_dir):
    """A CoCa run of the train loop (seconds): embeddings and captions."""
    return _trained(tmp_path_factory, shapes_data_dir, "experiments/coca_tiny_shapes.py:test")


def test_convert_reads_open_clip_config(converted):
    config = json.loads((converted / "config.json").read_text())
    image = config["model"]["image"]
    assert image["act"] == "quick_gelu" and config["model"]["text"]["act"] == "quick_gelu"
    assert image["pixel_mean"] == [0.5, 0.5, 0.5] and image["pixel_std"] == [0.5, 0.5, 0.5]
    assert config["model"]["dtype"] == "float32"  # Not the base config's bfloat16.
    assert config["eval"]["resize_mode"] == "shortest"


def test_readme_snippet_on_converted_open_clip(converted, trained, hub_io, tmp_path):
    """The snippet on the converted folder: embeddings as open_clip's pipeline makes them."""
    arrays = [hub_io[f"image_{i}"] for i in range(4)]  # 32x32 to 128x96: resized and cropped
    ns = _run_snippet(converted, trained, _write_images(tmp_path, arrays[1:3]))
    want_img, want_txt = hub_io["image_embeddings"], hub_io["text_embeddings"]
    np.testing.assert_allclose(ns["image_emb"], want_img[1:3], atol=1e-5, rtol=0)
    # The snippet's prompts are not the fixture's: encode the fixture's strings too.
    model = ns["model"]
    np.testing.assert_allclose(model.encode_image(arrays), want_img, atol=1e-5, rtol=0)
    strings = [str(s) for s in hub_io["strings"]]
    np.testing.assert_array_equal(model.tokens(strings), hub_io["tokens"])
    np.testing.assert_allclose(model.encode_text(strings), want_txt, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.logit_scale, float(hub_io["logit_scale"]), rtol=1e-6)
    classifier = ns["classifier"]
    assert classifier.shape == (2, ns["text_emb"].shape[1])
    np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, atol=1e-6)
    # The zero-shot classifier by hand (CLIP's recipe) from the embeddings open_clip would give.
    prompts = [t.format(c) for c in ("cat", "dog") for t in ("a photo of a {}.",
                                                            "a {} on grass.")]
    emb = model.encode_text(prompts).reshape(2, 2, -1).mean(1)
    np.testing.assert_allclose(classifier, emb / np.linalg.norm(emb, axis=1, keepdims=True),
                               atol=1e-6)
    assert ns["probs"].shape == (2, 2)
    # bfloat16, the dtype converted models used to run in, misses the reference by far more.
    bf16 = vlm_jax.load(converted, dtype="bfloat16")
    assert np.abs(bf16.encode_image(arrays) - want_img).max() > 1e-4


def test_readme_snippet_on_trained_run(trained, tmp_path):
    """The snippet on a run trained by the loop: the embeddings of `vlm-jax eval`'s feature
    extractor (another batch shape) and `vlm-jax caption`'s captions."""
    from vlm_jax import caption  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size, dtype=np.uint8) for size in
              [(32, 32, 3), (48, 40, 3), (20, 70, 3)]]
    paths = _write_images(tmp_path / "images", arrays)
    ns = _run_snippet(trained, trained, paths)

    config = config_lib.load_json_config(str(trained / "config.json"))
    s, params, _ = train.restore_for_inference(config, trained)
    tokenizer = s.family.make_data(config, for_eval=True).tokenizer  # data.prepare's
    extractor = FeatureExtractor(s.graphdef, params, s.param_shardings, s.mesh, s.rules, 64)
    _, pixels, _ = caption.read_images(tmp_path / "images", 32)  # vlm-jax caption's transform
    np.testing.assert_allclose(ns["image_emb"], extractor.images(pixels[:2]), atol=1e-6, rtol=0)
    texts = ["a photo of a cat", "a photo of a dog"]
    np.testing.assert_allclose(ns["text_emb"], extractor.texts(tokenizer.encode(texts)),
                               atol=1e-6, rtol=0)
    model = ns["model"]
    np.testing.assert_allclose(model.encode_image(paths), extractor.images(pixels), atol=1e-6,
                               rtol=0)
    # The captions vlm-jax caption writes (greedy, the run's captioning options).
    out = caption.caption_folder(config, str(trained), str(tmp_path / "images"),
                                 output=str(tmp_path / "captions.jsonl"))
    want = [json.loads(line)["caption"] for line in out.read_text().splitlines()]
    assert ns["captions"] == want[:1]
    assert ns["captioner"].generate(paths) == want


def test_tokenizer_travels_with_the_workdir(trained, tmp_path):
    """A trained workdir, moved where its shapes dataset is not, still loads its tokenizer:
    nothing is built or opened (the copy in <workdir>/tokenizer/)."""
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    config = json.loads((moved / "config.json").read_text())
    gone = tmp_path / "no_data_here"
    config["data"]["data_dir"] = str(gone)
    (moved / "config.json").write_text(json.dumps(config))
    model = vlm_jax.load(moved / "checkpoints" / "6")
    assert model.step == 6
    original = vlm_jax.load(trained)
    texts = ["a large red circle", "two small blue squares"]
    np.testing.assert_array_equal(model.tokens(texts), original.tokens(texts))
    assert not gone.exists()


def test_clear_errors(tmp_path, converted):
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

    with pytest.raises(ConfigError, match="convert it first"):
        vlm_jax.load(FIXTURE / "hub_tiny")
    with pytest.raises(ConfigError, match="does not exist"):
        vlm_jax.load(tmp_path / "missing")
    model = vlm_jax.load(converted)
    with pytest.raises(ConfigError, match="'caption' capability"):
        model.generate(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        model.encode_image([np.zeros((32, 32, 3), np.float32)])


@pytest.fixture(scope="module")
def flamingo(tmp_path_factory):
    """A Flamingo workdir (experiments/flamingo_tiny_shapes.py:test) with random parameters
    (tests/model_fixtures.randomize: the cross-attention gates open, so images matter), written
    as `vlm-jax convert` writes one; its tokenizer ships with vlm_jax (no data is built)."""
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from tests.model_fixtures import randomize  # pylint: disable=import-outside-toplevel
    from vlm_jax import convert  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

    config = config_lib.load_config(str(ROOT / "experiments/flamingo_tiny_shapes.py") + ":test")
    model = nnx.eval_shape(lambda: get_family(config).build_model(config.model, nnx.Rngs(0)))
    randomize(model, seed=1, scale=0.3)
    workdir = tmp_path_factory.mktemp("api") / "flamingo"
    convert.write_workdir(workdir, nnx.state(model).to_pure_dict(), config)
    return workdir


def test_fewshot_generate_matches_the_fewshot_evaluator(flamingo):
    """Flamingo: generate(prompts=[[(image, text), ...], ...]) gives the continuations the
    few-shot captioning evaluator generates for the same examples and queries."""
    from input_pipeline.interleaved import PromptFormat  # pylint: disable=import-outside-toplevel
    from vlm_jax.evaluators import fewshot  # pylint: disable=import-outside-toplevel

    model = vlm_jax.load(flamingo)
    size = model.preprocess.size
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    captions = ["a red circle", "two blue squares on the left", "a small green triangle"]
    queries = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    shots, max_new = 2, 6
    config = config_lib.load_json_config(str(flamingo / "config.json"))
    s, params, _ = train.restore_for_inference(config, flamingo)
    extractor = FeatureExtractor(s.graphdef, params, s.param_shardings, s.mesh, s.rules, 8)
    tokenizer = model.tokenizer
    from flax import nnx  # pylint: disable=import-outside-toplevel

    inner = nnx.merge(s.graphdef, params)
    data = {"pool": {"image": pool, "caption": captions}, "image": queries,
            "prompt_format": PromptFormat(tokenizer, inner.image_id, inner.eoc_id)}
    want = fewshot.generate_fewshot(extractor, tokenizer, data, "caption", shots, max_new)
    prompts = [[(pool[j], captions[j]) for j in fewshot._example_order(i, 3, shots)]  # pylint: disable=protected-access
               + [(queries[i], "")] for i in range(len(queries))]
    got = model.generate(prompts=prompts, max_new_tokens=max_new)
    assert got == want
    assert len(set(got)) > 1, got  # the images change the continuation
    with pytest.raises(ValueError, match="same number of images"):
        model.generate(prompts=[prompts[0], prompts[1][1:]], max_new_tokens=max_new)


def test_load_from_gcs(gcs_emulator, hub_io):
    """A workdir in a bucket (here converted straight into it) loads like a local one."""
    import uuid  # pylint: disable=import-outside-toplevel

    from vlm_jax import convert  # pylint: disable=import-outside-toplevel

    workdir = f"{gcs_emulator.create_bucket(f'vlm-api-{uuid.uuid4().hex[:10]}')}/converted"
    convert.convert(str(FIXTURE / "hub_tiny"), workdir)
    model = vlm_jax.load(f"{workdir}/checkpoints/0")
    arrays = [hub_io[f"image_{i}"] for i in range(4)]
    np.testing.assert_allclose(model.encode_image(arrays), hub_io["image_embeddings"],
                               atol=1e-5, rtol=0)
    strings = [str(s) for s in hub_io["strings"]]
    np.testing.assert_allclose(model.encode_text(strings), hub_io["text_embeddings"],
                               atol=1e-5, rtol=0)
