"""Evaluators by type: ``evaluate(extractor, tokenizer, data, **options) -> {metric: value}``.

``NEEDS[type]``: the keys of the evaluation data an evaluator reads; ``WHAT[type]``: what kind of
data that is and where to find it, for the error message; ``CAPABILITY[type]``: what it asks of
the model (``Family.capabilities``: embed, caption, interleaved, lm, locate).
:mod:`vlm_jax.evaluation` compares them with what each entry's dataset provides (from its
metadata, before any example is read) and with the model's capabilities, at the start of a run.
"""

from vlm_jax.evaluators import (captioning, fewshot, linear_probe, localisation, retrieval,
                                zeroshot)

EVALUATORS = {
    "zeroshot": zeroshot.evaluate,
    "retrieval": retrieval.evaluate,
    "linear_probe": linear_probe.evaluate,
    "captioning": captioning.evaluate,
    "fewshot_vqa": fewshot.evaluate_vqa,
    "fewshot_captioning": fewshot.evaluate_captioning,
    "lm_loss": fewshot.evaluate_lm,
    "refexp": localisation.evaluate,
}
NEEDS = {
    "zeroshot": ("image", "label", "class_names", "templates"),
    "retrieval": ("image", "text"),
    "linear_probe": ("image", "label", "probe_train"),
    "captioning": ("image",),  # + 'captions' (several per image) or 'caption': checked there
    "fewshot_vqa": ("image", "question", "answer", "pool", "prompt_format"),
    "fewshot_captioning": ("image", "pool", "prompt_format"),  # + caption(s): checked there
    "lm_loss": ("documents", "weights"),
    "refexp": ("image", "refexp", "refexp_bbox"),
}
WHAT = {
    "zeroshot": "a classification dataset (labels and class names), e.g. dataset='shapes' or "
                "'tfds:imagenet2012'",
    "retrieval": "images with captions, e.g. dataset='shapes' or 'tfds:coco_captions'",
    "linear_probe": "a classification dataset with the splits options.probe_split and "
                    "probe_val_split (default train, validation)",
    "captioning": "images with reference captions, and a captioning model (CoCa, LocCa), e.g. "
                  "experiments/coca_tiny_shapes.py on the shapes splits",
    "fewshot_vqa": "images with questions and answers, an in-context pool, and a Flamingo model: "
                   "experiments/flamingo_tiny_shapes.py on the shapes splits",
    "fewshot_captioning": "images with captions, an in-context pool, and a Flamingo model: "
                          "experiments/flamingo_tiny_shapes.py on the shapes splits or "
                          "dataset='tfds:coco_captions'",
    "lm_loss": "held-out text documents, and a language model: experiments/lm_tiny_shapes.py",
    "refexp": "images with referring expressions and their boxes (shapes 1.2.0 and later), and "
              "a model that predicts boxes (LocCa: experiments/locca_tiny_shapes.py)",
}


# The model capability each evaluator needs (vlm_jax.families: Family.capabilities).
CAPABILITY = {
    "zeroshot": "embed",
    "retrieval": "embed",
    "linear_probe": "embed",
    "captioning": "caption",
    "fewshot_vqa": "interleaved",
    "fewshot_captioning": "interleaved",
    "lm_loss": "lm",
    "refexp": "locate",
}
CAPABILITIES = {
    "embed": "encode_image / encode_text to normalised embeddings: CLIP, SigLIP, CoCa, LocCa",
    "caption": "an image-conditioned text decoder: CoCa, LocCa",
    "interleaved": "generation from interleaved images and text: Flamingo",
    "lm": "next-token logits over text: a language model, Flamingo",
    "locate": "locate(images, expressions) -> [N, 4] boxes: LocCa (experiments/"
              "locca_tiny_shapes.py)",
}

