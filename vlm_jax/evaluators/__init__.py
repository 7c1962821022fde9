"""Evaluators chosen by name: each is ``evaluate(extractor, tokenizer, data) -> {metric: value}``.

``NEEDS[name]``: the keys of the evaluation data an evaluator reads; ``WHAT[name]``: what kind of
data that is and where to find it, for the error message; ``MODELS[name]``: the models
(``config.model.name``) it runs on. :func:`check_fits` compares them with what a dataset
provides and the run's model, at the start of a run (from the dataset's metadata, before any
example is read) and again before evaluating.
"""

from collections.abc import Collection, Sequence

from vlm_jax.config import ConfigError
from vlm_jax.evaluators import captioning, fewshot, linear_probe, retrieval, zeroshot

EVALUATORS = {
    "zeroshot": zeroshot.evaluate,
    "retrieval": retrieval.evaluate,
    "linear_probe": linear_probe.evaluate,
    "captioning": captioning.evaluate,
    "fewshot_vqa": fewshot.evaluate_vqa,
    "fewshot_captioning": fewshot.evaluate_captioning,
    "lm_loss": fewshot.evaluate_lm,
}
NEEDS = {
    "zeroshot": ("image", "label", "class_names", "templates"),
    "retrieval": ("image", "text"),
    "linear_probe": ("image", "label", "probe_train"),
    "captioning": ("image",),  # + 'captions' (several per image) or 'caption': checked there
    "fewshot_vqa": ("image", "question", "answer", "pool", "prompt_format"),
    "fewshot_captioning": ("image", "pool", "prompt_format"),  # + caption(s): checked there
    "lm_loss": ("documents", "weights"),
}
WHAT = {
    "zeroshot": "a classification dataset (labels and class names), e.g. the shapes splits or "
                "config.eval.dataset=tfds:imagenet2012",
    "retrieval": "images with captions, e.g. the shapes splits or "
                 "config.eval.dataset=tfds:coco_captions",
    "linear_probe": "a classification dataset with the splits config.eval.probe_split and "
                    "probe_val_split (default train, validation)",
    "captioning": "images with reference captions, and a captioning model (CoCa), e.g. "
                  "experiments/coca_tiny_shapes.py on the shapes splits",
    "fewshot_vqa": "images with questions and answers, an in-context pool, and a Flamingo model: "
                   "experiments/flamingo_tiny_shapes.py on the shapes splits",
    "fewshot_captioning": "images with captions, an in-context pool, and a Flamingo model: "
                          "experiments/flamingo_tiny_shapes.py on the shapes splits or "
                          "config.eval.dataset=tfds:coco_captions",
    "lm_loss": "held-out text documents, and a language model: experiments/lm_tiny_shapes.py",
}


# config.model.name of the models an evaluator runs on.
MODELS = {
    "zeroshot": ("clip", "coca"),  # image and text towers (encode_image / encode_text)
    "retrieval": ("clip", "coca"),
    "linear_probe": ("clip", "coca"),
    "captioning": ("coca",),
    "fewshot_vqa": ("flamingo",),
    "fewshot_captioning": ("flamingo",),
    "lm_loss": ("lm",),
}


def _misfit(name: str, provided: Collection[str], model: str | None) -> list[str]:
    """What evaluator ``name`` lacks: data keys not ``provided``, or the model it needs."""
    reasons = []
    missing = [k for k in NEEDS[name] if k not in provided]
    if missing:
        reasons.append(f"the data has no {missing}")
    if model is not None and name in MODELS and model not in MODELS[name]:
        reasons.append(f"config.model.name is {model!r}, not {' or '.join(MODELS[name])}")
    return reasons


def supported(provided: Collection[str], model: str | None = None) -> list[str]:
    """The evaluators that can run on evaluation data with the keys ``provided`` (and, if given,
    with the model named ``model``)."""
    return [name for name in EVALUATORS if not _misfit(name, provided, model)]


def check_fits(names: Sequence[str], provided: Collection[str], dataset: str,
               model: str | None = None) -> None:
    """Checks that every evaluator of ``names`` is known and can run on evaluation data that has
    the keys ``provided`` (those of the loaded data, or those a dataset's metadata says it will
    have) with the model ``config.model.name == model``; ``dataset`` (``shapes/test``,
    ``tfds:cifar10/test``) names the data in the message.

    Raises:
        ConfigError: naming each evaluator that does not fit, what it needs, what the data or
            model lacks, and the evaluators that can run on this dataset and model.
    """
    unknown = [name for name in names if name not in EVALUATORS]
    if unknown:
        raise ConfigError(f"config.eval.evaluators: unknown evaluator(s) {unknown}; available: "
                          f"{sorted(EVALUATORS)}.")
    misfits = {name: _misfit(name, provided, model) for name in names}
    lines = [f"  {name!r} needs {WHAT[name]}; {' and '.join(reasons)}."
             for name, reasons in misfits.items() if reasons]
    if not lines:
        return
    ok = supported(provided, model)
    on = f"{dataset} with the {model} model" if model else dataset
    raise ConfigError(
        f"config.eval.evaluators={list(names)} cannot run on the evaluation data {dataset}:\n"
        + "\n".join(lines) + f"\nOn {on} these evaluators run: {ok or 'none'}. Choose among "
        "them with --evaluators / --config.eval.evaluators, or set config.eval.dataset (and "
        "the model) to what the evaluator needs.")
