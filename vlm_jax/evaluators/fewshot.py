"""Few-shot (in-context) evaluation of Flamingo: VQA accuracy and captioning CIDEr with 0, 4, 8...
image-text examples in the prompt; and held-out perplexity of a language model.

Prompts follow open_flamingo's evaluation: the ``k`` examples, then the query (a VQA answer is
cut where a new ``question:`` / ``answer:`` would start, as open_flamingo's post-processing)::

    [bos] <image>question: q1 answer: a1<|endofchunk|> ... <image>question: q answer:
    [bos] <image>c1<|endofchunk|> ... <image>

The examples of query ``i`` are the first ``k`` of a permutation of the in-context pool (the
train split) seeded by ``i``, so the 4 examples of a 4-shot prompt are among the 8 of its 8-shot
prompt and every number of shots sees the same queries. Generation is greedy (KV cache) and
stops at ``<|endofchunk|>`` or ``eos``.

**VQA accuracy** is VQAv2's (the official ``vqaEval.py``): answers are normalised (lower case,
punctuation, number words to digits, articles dropped) and
``acc = mean over the 10 leave-one-out subsets of min(1, #matching annotators / 3)``. A dataset
with one answer per question (shapes) counts it as the answer of all 10 annotators, so the
accuracy is exact match after normalisation. Not reproduced from ``vqaEval.py``: its table of
contractions (``dont`` -> ``don't``, ...), which no shapes answer contains.

Baselines on the same questions: the single most frequent answer of the pool (the
majority-answer baseline) and the most frequent answer of the pool for each question (a
stronger, question-aware prior).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import parallel

# -------------------------------------------------------------------------------------------
# VQAv2 accuracy.
# -------------------------------------------------------------------------------------------

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """VQAv2's answer processing (``processPunctuation`` then ``processDigitArticle``)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the annotators' ``answers`` (10 in VQAv2; a
    single answer counts as 10 identical ones)."""
    answers = list(answers)
    if len(answers) == 1:
        answers = answers * 10
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return float(np.mean(accs))


def majority_baselines(pool_questions: Sequence[str], pool_answers: Sequence[str],
                       questions: Sequence[str], answers: Sequence) -> dict[str, float]:
    """VQA accuracy of the pool's most frequent answer, overall and per question."""
    overall = collections.Counter(pool_answers).most_common(1)[0][0]
    per_q: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q, a in zip(pool_questions, pool_answers):
        per_q[q][a] += 1
    acc_all, acc_q = [], []
    for q, a in zip(questions, answers):
        gts = [a] if isinstance(a, str) else list(a)
        acc_all.append(vqa_accuracy(overall, gts))
        guess = per_q[q].most_common(1)[0][0] if q in per_q else overall
        acc_q.append(vqa_accuracy(guess, gts))
    return {"vqa_majority_baseline": float(np.mean(acc_all)),
            "vqa_question_prior_baseline": float(np.mean(acc_q))}


# -------------------------------------------------------------------------------------------
# Prompts and generation.
# -------------------------------------------------------------------------------------------

def _example_order(query: int, pool_size: int, max_shots: int) -> np.ndarray:
    return np.random.default_rng([1234, query]).permutation(pool_size)[:max_shots]


def _left_pad(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(r) for r in rows)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        tokens[i, length - len(r):] = r
        valid[i, length - len(r):] = True
    return tokens, valid


class _Generator:
    """Greedy Flamingo generation (:func:`vlm_jax.decoding.generate`), data-parallel over the
    mesh (every process holds the prompts and gets every continuation back)."""

    def __init__(self, extractor, max_new_tokens: int):
        from vlm_jax import decoding  # pylint: disable=import-outside-toplevel

        self.ex = extractor
        graphdef, mesh, rules = extractor.graphdef, extractor.mesh, extractor.rules
        self.model = nnx.merge(graphdef, extractor.params)
        if not hasattr(self.model, "encode_media"):
            raise ValueError("few-shot evaluation needs a model of a family with the "
                             "'interleaved' capability (Flamingo).")

        def fn(p, images, tokens, valid):
            with parallel.sharding_context(mesh, rules):
                out = decoding.generate(graphdef, images, prompt=tokens, prompt_valid=valid,
                                        params=p, method="greedy", jit=False,
                                        max_new_tokens=max_new_tokens)
            return out[:, tokens.shape[1]:]  # the continuation

        self.fn = jax.jit(fn, in_shardings=(extractor.param_shardings, None, None, None),
                          out_shardings=NamedSharding(mesh, P()))

    def __call__(self, images: np.ndarray, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
        b, n = len(tokens), parallel.batch_shard_count(self.ex.mesh)
        batch = self.ex.global_batch({"images": images, "tokens": tokens, "valid": valid},
                                     -(-b // n) * n)  # whole shards
        out = self.fn(self.ex.params, batch["images"], batch["tokens"], batch["valid"])
        return np.asarray(out)[:b]


def _decode(tokenizer, model, ids: np.ndarray) -> str:
    """The generated text up to the end of its chunk (``<|endofchunk|>``, ``eos`` or a new
    ``<image>``)."""
    keep = []
    for t in ids.tolist():
        if t in (model.eoc_id, model.eos_id, model.image_id):
            break
        if 0 <= t < tokenizer.vocab_size and t not in (tokenizer.bos_id, tokenizer.pad_id):
            keep.append(t)
    return tokenizer._sp.decode(keep).strip()  # pylint: disable=protected-access


def generate_fewshot(extractor, tokenizer, data: Mapping, kind: str, shots: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers (``kind='vqa'``) or captions (``'caption'``) of every query of ``data``
    with ``shots`` in-context examples from ``data['pool']``, written as
    ``data['prompt_format']`` says (:class:`input_pipeline.interleaved.PromptFormat`)."""
    fmt = data["prompt_format"]
    gen = extractor.cached(("fewshot_generator", max_new_tokens),  # compiled once per run
                           lambda: _Generator(extractor, max_new_tokens))
    model = gen.model
    pool, images = data["pool"], data["image"]
    n_pool = len(pool["image"])
    if shots > n_pool:
        raise ValueError(f"{shots} shots need an in-context pool of at least {shots} examples; "
                         f"it has {n_pool} (the entry's options.fewshot_pool).")
    max_prompt = model.lm.cfg.max_length - max_new_tokens
    outputs: list[str] = []
    bs = extractor.batch_size
    for start in range(0, len(images), bs):
        rows, imgs = [], []
        for i in range(start, min(start + bs, len(images))):
            order = _example_order(i, n_pool, shots)
            if kind == "vqa":
                chunks = [fmt.vqa(pool["question"][j], pool["answer"][j]) for j in order]
                chunks.append(fmt.vqa(data["question"][i], None))
            else:
                chunks = [fmt.caption(pool["caption"][j]) for j in order] + [fmt.caption(None)]
            tokens, kept = fmt.tokens(chunks, max_prompt)
            if kept != len(chunks):
                raise ValueError(f"A {shots}-shot prompt does not fit in the language model's "
                                 f"max_length={model.lm.cfg.max_length} with {max_new_tokens} "
                                 "new tokens; use fewer shots (the entry's options.shots).")
            if (fmt.image_id, fmt.eoc_id) != (model.image_id, model.eoc_id):
                raise ValueError(f"The prompt format's <image> / <|endofchunk|> ids "
                                 f"{fmt.image_id} / {fmt.eoc_id} are not the model's "
                                 f"{model.image_id} / {model.eoc_id}.")
            rows.append(tokens)
            imgs.append(np.concatenate([pool["image"][order], images[i:i + 1]]))
        tokens, valid = _left_pad(rows, tokenizer.pad_id)
        out = gen(np.stack(imgs), tokens, valid)  # uint8 or normalised float: the ViT knows
        outputs += [_decode(tokenizer, model, row) for row in out]
    return outputs


def _shots(options: Mapping) -> tuple[int, ...]:
    shots = tuple(int(k) for k in options.get("shots", (0, 4, 8)))
    if not shots or min(shots) < 0:
        raise ValueError(f"shots={shots}: give non-negative numbers of in-context examples.")
    return shots


def evaluate_vqa(extractor, tokenizer, data: Mapping, **options) -> dict[str, float]:
    """``vqa_accuracy_<k>shot`` for each ``options['shots']`` (default 0, 4, 8) and the
    baselines of :func:`majority_baselines`. ``data``: ``image``, ``question``, ``answer``
    (a string or the annotators' list per question) and the in-context ``pool``."""
    max_new = int(options.get("max_new_tokens", 8))
    results = majority_baselines(data["pool"]["question"], data["pool"]["answer"],
                                 data["question"], data["answer"])
    for k in _shots(options):
        preds = generate_fewshot(extractor, tokenizer, data, "vqa", k, max_new)
        # As open_flamingo's postprocess_vqa_generation: the answer ends where a new question
        # or answer would start.
        preds = [re.split(r"question:|answer:", p, maxsplit=1)[0] for p in preds]
        accs = [vqa_accuracy(p, [a] if isinstance(a, str) else a)
                for p, a in zip(preds, data["answer"])]
        results[f"vqa_accuracy_{k}shot"] = float(np.mean(accs))
    return results


def evaluate_captioning(extractor, tokenizer, data: Mapping, **options) -> dict[str, float]:
    """``cider_<k>shot`` / ``bleu4_<k>shot`` of greedy captions with ``k`` example captions."""
    from vlm_jax.evaluators.captioning import (  # pylint: disable=import-outside-toplevel
        data_references, caption_metrics)

    max_new = int(options.get("max_new_tokens", 24))
    refs = data_references(data)
    results = {}
    for k in _shots(options):
        preds = generate_fewshot(extractor, tokenizer, data, "caption", k, max_new)
        m = caption_metrics(preds, refs)
        results[f"cider_{k}shot"] = m["cider"]
        results[f"bleu4_{k}shot"] = m["bleu4"]
    return results


def evaluate_lm(extractor, tokenizer, data: Mapping, **options) -> dict[str, float]:
    """Held-out next-token loss and perplexity of a language model on ``data['documents']``
    (weighted by ``data['weights']``, as the training loss)."""
    del tokenizer, options
    from vlm_jax.models.lm import next_token_loss  # pylint: disable=import-outside-toplevel

    graphdef, mesh, rules = extractor.graphdef, extractor.mesh, extractor.rules

    def build():
        def fn(p, tokens, weights):
            with parallel.sharding_context(mesh, rules):
                logits = nnx.merge(graphdef, p)(tokens)
            loss, n = next_token_loss(logits, tokens, weights)
            return loss * n, n

        return jax.jit(fn, in_shardings=(extractor.param_shardings, None, None))

    fn = extractor.cached("lm_loss", build)  # compiled once per run
    tokens, weights = jnp.asarray(data["documents"]), jnp.asarray(data["weights"])
    total, n = fn(extractor.params, tokens, weights)
    loss = float(total) / max(float(n), 1.0)
    return {"loss": loss, "perplexity": float(np.exp(loss))}
