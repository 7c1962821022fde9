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
    assert metadata.available() == ["cifar10", "cifar100", "imagenet1k"]
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
    with pytest.raises(ValueError, match=r"'imagenet21k'.*\['cifar10', 'cifar100', "
                                         r"'imagenet1k'\]"):
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
