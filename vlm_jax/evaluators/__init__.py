"""Evaluators chosen by name: each is ``evaluate(extractor, tokenizer, data) -> {metric: value}``.

``NEEDS[name]``: the keys of the evaluation data an evaluator reads (checked before any compute);
``WHAT[name]``: what kind of data that is, for the error message.
"""

from vlm_jax.evaluators import captioning, linear_probe, retrieval, zeroshot

EVALUATORS = {
    "zeroshot": zeroshot.evaluate,
    "retrieval": retrieval.evaluate,
    "linear_probe": linear_probe.evaluate,
    "captioning": captioning.evaluate,
}
NEEDS = {
    "zeroshot": ("image", "label", "class_names", "templates"),
    "retrieval": ("image", "text"),
    "linear_probe": ("image", "label", "probe_train"),
    "captioning": ("image",),  # + 'captions' (several per image) or 'caption': checked there
}
WHAT = {
    "zeroshot": "a classification dataset (labels and class names)",
    "retrieval": "images with captions",
    "linear_probe": "a classification dataset with a training split",
    "captioning": "images with reference captions, and a captioning model (CoCa)",
}
