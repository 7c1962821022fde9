"""Tests of vlm_jax/evaluators/metadata.py and its data files (zeroshot_metadata/).

The reference values come from the sources named in zeroshot_metadata/README.md: the SHA-256
digests below were computed from open_clip_torch 3.3.0's ``open_clip.zero_shot_metadata``
(``'\\n'.join(IMAGENET_CLASSNAMES)``, and the templates applied to ``'{}'``), and the spot checks
were read in that file and in openai/CLIP's data/prompts.md.
"""

import hashlib
import importlib.util
import pathlib

import pytest

from vlm_jax.evaluators import metadata

# sha256('\n'.join(...)) of open_clip 3.3.0's lists.
OPEN_CLIP_SHA256 = {
    "IMAGENET_CLASSNAMES":
        "571ae1c583b4be7da87519494c52bf405a46af05d5815627c7a0dee997068b60",
    "OPENAI_IMAGENET_TEMPLATES":
        "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af",
    "SIMPLE_IMAGENET_TEMPLATES":
        "6ef3883987d224b7949da69fe0b615af152e1560eaac4c5c38555e50c882d415",
}
COUNTS = {"imagenet1k": (1000, 80), "cifar10": (10, 18), "cifar100": (100, 18)}


def _sha256(items) -> str:
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def test_available_and_counts():
    assert metadata.available() == ["caltech101_vtab", "cifar10", "cifar100", "eurosat",
                                    "imagenet1k", "mnist", "pcam", "pets", "svhn"]
    assert metadata.with_templates() == sorted(
        [*metadata.available(), "cars", "dtd", "flowers", "food101", "resisc45"])
    for dataset, (num_names, num_templates) in COUNTS.items():
        assert len(metadata.class_names(dataset)) == num_names
        assert len(metadata.templates(dataset)) == num_templates
    assert metadata.template_kinds("imagenet1k") == ["openai", "simple"]
    assert len(metadata.templates("imagenet1k", kind="simple")) == 7


def test_imagenet_matches_open_clip():
    names = metadata.class_names("imagenet1k")
    assert _sha256(names) == OPEN_CLIP_SHA256["IMAGENET_CLASSNAMES"]
    assert _sha256(metadata.templates("imagenet1k")) == \
        OPEN_CLIP_SHA256["OPENAI_IMAGENET_TEMPLATES"]
    assert _sha256(metadata.templates("imagenet1k", "simple")) == \
        OPEN_CLIP_SHA256["SIMPLE_IMAGENET_TEMPLATES"]
    spots = {0: "tench", 1: "goldfish", 2: "great white shark", 21: "kite (bird of prey)",
             134: "crane bird", 517: "construction crane", 151: "Chihuahua",
             285: "Egyptian Mau", 972: "cliff", 999: "toilet paper"}
    assert {i: names[i] for i in spots} == spots
    templates = metadata.templates("imagenet1k")
    assert templates[0] == "a bad photo of a {}."
    assert templates[35] == "a {} in a video game."
    assert templates[-1] == "a tattoo of the {}."
    assert metadata.templates("imagenet1k", "simple") == (
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.")


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                    reason="open_clip not installed (the SHA-256 test covers it)")
def test_imagenet_equals_installed_open_clip():
    from open_clip import zero_shot_metadata as ref  # pylint: disable=import-outside-toplevel

    assert metadata.class_names("imagenet1k") == list(ref.IMAGENET_CLASSNAMES)
    assert metadata.templates("imagenet1k") == tuple(
        t("{}") for t in ref.OPENAI_IMAGENET_TEMPLATES)
    assert metadata.templates("imagenet1k", "simple") == tuple(
        t("{}") for t in ref.SIMPLE_IMAGENET_TEMPLATES)


def test_cifar_spot_checks():
    assert metadata.class_names("cifar10") == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    names = metadata.class_names("cifar100")
    assert names[:3] == ["apple", "aquarium fish", "baby"]
    assert names[47] == "maple tree" and names[58] == "pickup truck" and names[99] == "worm"
    assert names == sorted(names)  # CIFAR-100's fine labels are in alphabetical order
    for dataset in ("cifar10", "cifar100"):
        templates = metadata.templates(dataset)
        assert templates[0] == "a photo of a {}."
        assert templates[-1] == "a photo of the big {}."
        assert len(set(templates)) == len(templates)


def test_names_unique_except_openai_imagenet_duplicates():
    for dataset in ("cifar10", "cifar100"):
        names = metadata.class_names(dataset)
        assert len(set(names)) == len(names), dataset
    # OpenAI's ImageNet names, kept as published (see zeroshot_metadata/README.md), repeat
    # exactly two names; all the others are distinct.
    names = metadata.class_names("imagenet1k")
    repeated = {n: [i for i, m in enumerate(names) if m == n] for n in names
                if names.count(n) > 1}
    assert repeated == {"missile": [657, 744], "sunglasses": [836, 837]}
    assert len(set(names)) == 998


def test_every_template_formats():
    for dataset in metadata.available():
        for kind in metadata.template_kinds(dataset):
            templates = metadata.templates(dataset, kind)
            assert len(set(templates)) == len(templates), (dataset, kind)
            for template in templates:
                assert template.count("{}") == 1 and "{c}" not in template
                prompt = template.format("ice cream")
                assert "ice cream" in prompt and "{" not in prompt and "}" not in prompt
        for name in metadata.class_names(dataset):
            assert name == name.strip() and name and "\n" not in name


def test_unknown_dataset_and_kind():
    with pytest.raises(ValueError, match=r"'imagenet21k'.*\['caltech101_vtab', 'cifar10', "
                                         r"'cifar100', 'eurosat', 'imagenet1k'"):
        metadata.class_names("imagenet21k")
    with pytest.raises(ValueError, match="available"):
        metadata.templates("nope")
    with pytest.raises(ValueError, match=r"no template set 'fancy'.*\['openai', 'simple'\]"):
        metadata.templates("imagenet1k", kind="fancy")


def test_data_files_are_package_data(repo_root):
    """setup.py installs every file of zeroshot_metadata/ (a directory without __init__.py,
    so only package_data brings it along)."""
    setup_py = (repo_root / "setup.py").read_text()
    assert '"evaluators/zeroshot_metadata/*"' in setup_py
    data_dir = pathlib.Path(metadata.__file__).parent / "zeroshot_metadata"
    files = {p.name for p in data_dir.iterdir()}
    assert {"README.md", "imagenet1k_classnames.txt", "imagenet1k_templates_openai.txt",
            "imagenet1k_templates_simple.txt", "cifar10_classnames.txt",
            "cifar100_classnames.txt"} <= files
    readme = (data_dir / "README.md").read_text()
    for name in files - {"README.md"}:
        assert f"`{name}`" in readme, f"{name} has no source in zeroshot_metadata/README.md"


# sha256('\n'.join(...)) of clip_benchmark 1.6.2's en_classnames.json / en_zeroshot_classification_
# templates.json entries (keys as there), the sources of the DataComp tasks' files.
CLIP_BENCHMARK_SHA256 = {
    ("classnames", "caltech101_vtab", "caltech101_vtab"):
        "8cd73f5d8e14e75f9759d603fbb33fb86a417990630ab869f24ed0e2a452fe47",
    ("classnames", "eurosat", "eurosat"):
        "ee2e41b9973e7206862cbcded186c61be7b413418248f678e1bf80179da28d9c",
    ("classnames", "pets", "pets"):
        "50be1443390f8a02e835fed1dbc90ef03af4f27253569f3f55aede2cb62915be",
    ("classnames", "pcam", "pcam"):
        "27352df7ede1fd87a26ed6ec3eb45afcf7d9d043f60737c04a34121a22f75fd6",
    ("classnames", "svhn", "svhn"):
        "dfab20279a0857952f4261ebbc7fd6e27996c6eb067c1fc8fc3ae4bd82eee209",
    ("classnames", "mnist", "mnist"):
        "29dd21f55e4611d4c787c2148e39b4e341d4c10701dd03eed360aa55035bdb34",
    ("templates", "caltech101_vtab", "caltech101"):
        "d0359fcd9eb14baec1b61be02b63fcd7151738460ee8bb05a1f02994936cad9a",
    ("templates", "eurosat", "eurosat"):
        "84e63e79ba0bb990609f05e8224b508994d80d7114943f1b5bb44f10d0526bdc",
    ("templates", "pets", "pets"):
        "ee5e9e3f42e3ca57fd438cafdb60ca35552872ddc8a5d72a7cf492969acc3bec",
    ("templates", "pcam", "pcam"):
        "6bc4924b0f83d17262d69b4233331f3b6567ca76e861a6b78fdef3a9218766d5",
    ("templates", "svhn", "svhn"):
        "93b522c05d45cc213752c8cab8c7c8737be763ce3b144c684b4568e0c24f5a5c",
    ("templates", "mnist", "mnist"):
        "1b9b98b6c7bf8e9d6eb31efb6bb95ccceee14b124b1e20477c5cb571902b0d86",
    ("templates", "dtd", "dtd"):
        "38047254790e4cff8efdacedd13197b94083096083e51453a709f3a3b6337a9c",
    ("templates", "food101", "food101"):
        "ed37b8edb44968e5156d637323e1d078c161703ac9ea3d1a10c4abb5d7a0d25e",
    ("templates", "flowers", "flowers"):
        "15a4cd24ceee766aabe06a42fa7cfe88c87514349a4d4641303100c4f87fb868",
    ("templates", "resisc45", "resisc45"):
        "4a25337a6d387c18abf5e0a84c530078f537ee2bd114ea3b15f187c9bf00ce87",
    ("templates", "cars", "cars"):
        "a9a744a57eb69793667826b28ac4e5ad0605753d5d3d4f054bf2f4e5135c9e06",
}


def _ours(kind, dataset):
    if kind == "classnames":
        return metadata.class_names(dataset)
    return [t.replace("{}", "{c}") for t in metadata.templates(dataset)]  # as written there


@pytest.mark.parametrize("kind, dataset, key", sorted(CLIP_BENCHMARK_SHA256))
def test_datacomp_files_equal_clip_benchmarks(kind, dataset, key):
    assert _sha256(_ours(kind, dataset)) == CLIP_BENCHMARK_SHA256[kind, dataset, key]


def test_vtab_class_names_follow_tfds_label_order(tmp_path):
    """The class names read with a TFDS dataset (eval_data.TFDS_TO_METADATA) are in its label
    order: as many as its ClassLabel, and each textual name closest to the TFDS label name at
    its own index (TFDS' builder code, no data needed)."""
    import difflib  # pylint: disable=import-outside-toplevel

    tfds = pytest.importorskip("tensorflow_datasets")
    from input_pipeline import eval_data  # pylint: disable=import-outside-toplevel

    def norm(name):
        return "".join(ch for ch in name.lower() if ch.isalnum())

    for tfds_name, meta in [("caltech101", "caltech101_vtab"), ("eurosat/rgb", "eurosat"),
                            ("oxford_iiit_pet", "pets"), ("patch_camelyon", "pcam"),
                            ("svhn_cropped", "svhn"), ("mnist", "mnist")]:
        assert eval_data.TFDS_TO_METADATA[tfds_name.split("/")[0]] == meta
        labels = tfds.builder(tfds_name, data_dir=str(tmp_path)).info.features["label"].names
        ours = metadata.class_names(meta)
        assert len(ours) == len(labels), tfds_name
        if labels[0].isdigit():
            continue  # '0', '1', ...: nothing to match by text
        same = sum(max(range(len(labels)), key=lambda j, n=norm(name): difflib.SequenceMatcher(
            None, n, norm(labels[j])).ratio()) == i for i, name in enumerate(ours))
        assert same >= 0.7 * len(ours), (tfds_name, same, len(ours))
