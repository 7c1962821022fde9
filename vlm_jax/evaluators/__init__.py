"""Evaluators chosen by name: each is ``evaluate(extractor, tokenizer, data) -> {metric: value}``.

``NEEDS[name]``: the keys of the evaluation data an evaluator reads (checked before any compute);
``WHAT[name]``: what kind of data that is, for the error message.
"""

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
    "zeroshot": "a classification dataset (labels and class names)",
    "retrieval": "images with captions",
    "linear_probe": "a classification dataset with a training split",
    "captioning": "images with reference captions, and a captioning model (CoCa)",
    "fewshot_vqa": "images with questions and answers, an in-context pool, and a Flamingo model",
    "fewshot_captioning": "images with captions, an in-context pool, and a Flamingo model",
    "lm_loss": "held-out text documents, and a language model",
}
