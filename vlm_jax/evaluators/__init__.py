"""Evaluators chosen by name: each is ``evaluate(extractor, tokenizer, data) -> {metric: value}``."""

from vlm_jax.evaluators import retrieval, zeroshot

EVALUATORS = {
    "zeroshot": zeroshot.evaluate,
    "retrieval": retrieval.evaluate,
}
