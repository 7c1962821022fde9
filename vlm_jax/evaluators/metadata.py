"""Class names and prompt templates for zero-shot classification of standard datasets.

The text lives in data files under ``zeroshot_metadata/`` (their sources and licences are in
``zeroshot_metadata/README.md``): ``<dataset>_classnames.txt`` (one name per line, line ``i`` is
label ``i``) and ``<dataset>_templates_<kind>.txt`` (one template per line). They reproduce the
prompts of OpenAI's CLIP evaluations, as open_clip and CLIP_benchmark use them, so zero-shot
accuracies here are comparable with published ones.

Zero-shot prompts are ``template.format(class_name)``::

    names = class_names("imagenet1k")                 # 1000 names, label order
    prompts = [t.format(c) for c in names for t in templates("imagenet1k")]  # 80 templates
    templates("imagenet1k", kind="simple")            # OpenAI's 7-template subset
"""

from __future__ import annotations

import functools
import importlib.resources
import re

DEFAULT_KIND = "openai"
_DIR = "zeroshot_metadata"
_CLASSNAMES_SUFFIX = "_classnames.txt"
_TEMPLATES_RE = re.compile(r"^(?P<dataset>.+)_templates_(?P<kind>[a-z0-9]+)\.txt$")


def _files():
    return importlib.resources.files("vlm_jax.evaluators") / _DIR


@functools.cache
def _index() -> dict[str, dict[str, str]]:
    """``{dataset: {'classnames': file, 'templates/<kind>': file, ...}}`` of the data files."""
    index: dict[str, dict[str, str]] = {}
    for entry in _files().iterdir():
        name = entry.name
        if name.endswith(_CLASSNAMES_SUFFIX):
            index.setdefault(name[:-len(_CLASSNAMES_SUFFIX)], {})["classnames"] = name
        elif match := _TEMPLATES_RE.match(name):
            index.setdefault(match["dataset"], {})[f"templates/{match['kind']}"] = name
    return index


@functools.cache
def _read_lines(filename: str) -> tuple[str, ...]:
    text = (_files() / filename).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    for i, line in enumerate(lines, 1):
        if not line.strip() or line != line.strip():
            raise ValueError(f"{_DIR}/{filename} line {i} is blank or has leading/trailing "
                             f"whitespace ({line!r}); fix the data file.")
    return tuple(lines)


def available() -> list[str]:
    """Names of the datasets with class names and templates, sorted."""
    return sorted(d for d, files in _index().items()
                  if "classnames" in files and any(k.startswith("templates/") for k in files))


def _entry(dataset: str) -> dict[str, str]:
    if dataset not in available():
        raise ValueError(f"No zero-shot metadata for dataset {dataset!r}; available: "
                         f"{available()}. Add <name>_classnames.txt and "
                         f"<name>_templates_{DEFAULT_KIND}.txt to vlm_jax/evaluators/{_DIR}/.")
    return _index()[dataset]


def class_names(dataset: str) -> list[str]:
    """Class names of ``dataset`` in label order (entry ``i`` names label ``i``).

    Raises:
        ValueError: unknown dataset (the message lists the available ones).
    """
    return list(_read_lines(_entry(dataset)["classnames"]))


def with_templates() -> list[str]:
    """Names of the datasets with templates (some, read with their TFDS label names, have no
    class names file), sorted."""
    return sorted(d for d, files in _index().items() if any(k.startswith("templates/")
                                                            for k in files))


def _template_entry(dataset: str) -> dict[str, str]:
    if dataset not in with_templates():
        raise ValueError(f"No zero-shot templates for dataset {dataset!r}; available: "
                         f"{with_templates()}. Add <name>_templates_{DEFAULT_KIND}.txt to "
                         f"vlm_jax/evaluators/{_DIR}/.")
    return _index()[dataset]


def template_kinds(dataset: str) -> list[str]:
    """The template sets of ``dataset``, e.g. ``['openai', 'simple']`` for ``imagenet1k``."""
    return sorted(k.split("/", 1)[1] for k in _template_entry(dataset)
                  if k.startswith("templates/"))


def templates(dataset: str, kind: str = DEFAULT_KIND) -> tuple[str, ...]:
    """Prompt templates of ``dataset``; each holds one ``{}`` for ``template.format(name)``.

    Args:
        dataset: a name from :func:`with_templates`.
        kind: template set, ``'openai'`` (the published evaluation's set; default) or another
            of :func:`template_kinds` (``'simple'``: OpenAI's 7-template ImageNet subset).

    Raises:
        ValueError: unknown dataset or kind, or a data file whose template has no single ``{}``.
    """
    entry = _template_entry(dataset)
    key = f"templates/{kind}"
    if key not in entry:
        raise ValueError(f"Dataset {dataset!r} has no template set {kind!r}; it has "
                         f"{template_kinds(dataset)}.")
    out = []
    for i, line in enumerate(_read_lines(entry[key]), 1):
        template = line.replace("{c}", "{}")
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or \
                template.replace("{}", "").count("}"):
            raise ValueError(f"{_DIR}/{entry[key]} line {i}: {line!r} must contain exactly one "
                             "'{}' or '{c}' and no other braces; fix the data file.")
        out.append(template)
    return tuple(out)
