"""Interleaved image-text documents from the shapes dataset (Flamingo), and their text alone
(language-model pretraining); interleaved web documents in webdataset tars (OBELICS / MMC4
layouts, the second half of this module).

A *document* is a sequence of up to ``max_images`` image-text chunks built from consecutive
records of a shuffled split; every chunk is one record's image and one of its texts:

* a **caption document** (probability 1/2) has the records' captions;
* a **question document** has ``question: <q> answer: <a>`` chunks. Like pages on the web, a
  document keeps one answer style throughout: the short answer (``answer: red``, probability
  0.6) or a sentence (``answer: the star is red``, 0.4).

The answer style is what in-context examples can teach: without examples, a model must guess
the style and answers with a sentence when it is unsure of the short answer; with short-answer
examples in the prompt it can copy their style. This is the reason the Flamingo paper gives for
its few-shot VQA gains (open-ended answers that do not match the expected short form).

Token layout (``image_id`` / ``eoc_id``: the ``<image>`` and ``<|endofchunk|>`` tokens Flamingo
adds to the language model's vocabulary, open_flamingo's layout)::

    [bos] <image> t t t <|endofchunk|> <image> t t <|endofchunk|> ... [eos] [pad ...]

The language model's documents are the same texts without images: ``[bos] t t t t t ... [eos]``,
packed (``docs_per_row > 1``) as language models are pretrained: each row is the concatenation of
consecutive documents, cut at ``max_length``, so no position is padding and the model sees
positions up to ``max_length`` (few-shot prompts are longer than one training document).
Multimodal documents longer than ``max_length`` keep their first chunks that fit. ``weights`` marks the
tokens that are prediction targets: texts, ``<|endofchunk|>`` and ``eos`` (not ``<image>``,
``bos`` or padding).

The texts are tokenised with the language-model tokenizer shipped in ``assets/``
(:func:`lm_tokenizer`): the captions tokenizer of the dataset never saw questions.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from input_pipeline import DataError
from input_pipeline import pipeline, sources
from input_pipeline.shapes import generator
from input_pipeline.sources import IMAGE_EXTENSIONS
from input_pipeline.tokenizers import SentencePieceTokenizer, train_sentencepiece
from input_pipeline.transforms import (SKIP_STATS, DecodeImage, KeepValid, ResizeCenterCrop,
                                       check_image, to_str)

LM_TOKENIZER_PATH = os.path.join(os.path.dirname(__file__), "assets", "shapes_lm_bpe.model")
LM_VOCAB_SIZE = 512
P_QUESTION_DOCUMENT = 0.5
P_SHORT_ANSWER = 0.6


# -------------------------------------------------------------------------------------------
# Texts.
# -------------------------------------------------------------------------------------------

_SENTENCES = (  # question pattern -> answer sentence (the generator's five question kinds)
    (re.compile(r"^what color is the largest shape\?$"), "the largest shape is {a}"),
    (re.compile(r"^what color is the (\w+)\?$"), "the {0} is {a}"),
    (re.compile(r"^what shape is the (\w+) object\?$"), "it is a {a}"),
    (re.compile(r"^how many shapes are there\?$"), "there are {a} shapes"),
    (re.compile(r"^is the background light or dark\?$"), "the background is {a}"),
)


def answer_sentence(question: str, answer: str) -> str:
    """The answer as a sentence (``the star is red``) for the generator's questions."""
    for pattern, template in _SENTENCES:
        m = pattern.match(question)
        if m:
            return template.format(*m.groups(), a=answer)
    raise DataError(f"No answer sentence for the question {question!r}.")


def qa_text(question: str, answer: str | None, short: bool = True) -> str:
    """``question: <q> answer: <a>``; ``answer=None`` gives the prompt ``question: <q> answer:``."""
    if answer is None:
        return f"question: {question} answer:"
    return f"question: {question} answer: {answer if short else answer_sentence(question, answer)}"


def document_texts(records: Sequence[dict], rng: np.random.Generator) -> list[str]:
    """The chunk texts of one document made of ``records`` (see the module doc)."""
    if rng.random() >= P_QUESTION_DOCUMENT:
        return [to_str(r["caption"]) for r in records]
    short = bool(rng.random() < P_SHORT_ANSWER)
    return [qa_text(to_str(r["question"]), to_str(r["answer"]), short) for r in records]


def _tokenizer_corpus(n: int = 20000) -> list[str]:
    """Texts of the first ``n`` training scenes in every form the documents use."""
    seed = generator.SPLIT_SEEDS["train"]
    texts = []
    for i in range(n):
        scene = generator.sample_scene(seed, i)
        texts += [scene.caption, qa_text(scene.question, scene.answer, True),
                  qa_text(scene.question, scene.answer, False)]
    return texts


def write_lm_tokenizer(path: str = LM_TOKENIZER_PATH) -> str:
    """Trains the language-model BPE (512 pieces) on generated shapes texts; deterministic, so
    the shipped asset can be checked against a rebuild (tests/test_interleaved.py)."""
    return train_sentencepiece(_tokenizer_corpus(), path.removesuffix(".model"), LM_VOCAB_SIZE)


def lm_tokenizer(context_length: int = 128) -> SentencePieceTokenizer:
    """The shipped shapes language-model tokenizer (pad 0, unk 1, bos 2, eos 3)."""
    return SentencePieceTokenizer(LM_TOKENIZER_PATH, context_length)


# -------------------------------------------------------------------------------------------
# Token layout.
# -------------------------------------------------------------------------------------------

def layout(chunks: Sequence[str], tokenizer: SentencePieceTokenizer, max_length: int, *,
           image_id: int | None, eoc_id: int | None, close: bool = True
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tokens int32 [max_length], weights float32 [max_length], chunks kept)``: the
    :func:`document_ids` padded to ``max_length``."""
    ids, weights, kept = document_ids(chunks, tokenizer, max_length, image_id=image_id,
                                      eoc_id=eoc_id, close=close)
    tokens = np.full((max_length,), tokenizer.pad_id, np.int32)
    tokens[:len(ids)] = ids
    w = np.zeros((max_length,), np.float32)
    w[:len(weights)] = weights
    return tokens, w, kept


def document_ids(chunks: Sequence[str], tokenizer: SentencePieceTokenizer,
                 max_length: int | None, *, image_id: int | None, eoc_id: int | None,
                 close: bool = True) -> tuple[list[int], list[float], int]:
    """``(token ids, target weights, chunks kept)`` of a document, unpadded: the first chunks
    that fit in ``max_length`` tokens (None: all).

    With ``image_id`` each chunk is ``<image> text <|endofchunk|>`` (a multimodal document),
    else chunk texts follow each other (text only). ``close=False`` leaves the last chunk open
    (a prompt: no ``<|endofchunk|>`` / ``eos`` after it).
    """
    limit = float("inf") if max_length is None else max_length
    sp = tokenizer._sp  # pylint: disable=protected-access
    ids, weights = [tokenizer.bos_id], [0.0]
    kept = 0
    for i, text in enumerate(chunks):
        last = i == len(chunks) - 1
        piece = ([image_id] if image_id is not None else []) + sp.encode(text)
        w = ([0.0] if image_id is not None else []) + [1.0] * (len(piece) - (image_id is not None))
        if image_id is not None and (close or not last):
            piece, w = piece + [eoc_id], w + [1.0]
        if len(ids) + len(piece) + (1 if close else 0) > limit:
            break
        ids += piece
        weights += w
        kept += 1
    if kept == 0:
        raise DataError(f"The first chunk of a document does not fit in max_length={max_length} "
                        f"tokens ({chunks[0]!r}); raise the model's max_length.")
    if close:
        ids.append(tokenizer.eos_id)
        weights.append(1.0)
    return ids, weights, kept


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How few-shot prompts of these documents are written and tokenised (the evaluation data
    carries it, so the few-shot evaluators do not depend on one dataset's format)."""

    tokenizer: SentencePieceTokenizer
    image_id: int
    eoc_id: int

    def vqa(self, question: str, answer: str | None) -> str:
        """An example (short answer) or, with ``answer=None``, the query."""
        return qa_text(question, answer)

    def caption(self, caption: str | None) -> str:
        """An example caption or, with ``None``, the query (nothing after its image)."""
        return caption or ""

    def tokens(self, chunks: Sequence[str], max_length: int) -> tuple[np.ndarray, int]:
        """The open prompt's real tokens (no padding) and the number of chunks that fit."""
        ids, _, kept = document_ids(chunks, self.tokenizer, max_length, image_id=self.image_id,
                                    eoc_id=self.eoc_id, close=False)
        return np.asarray(ids, np.int32), kept


class _DocumentFields(grain.transforms.Map):
    """The record features documents read: grain batches records feature by feature, and the
    per-object features of shapes 1.2.0 (boxes, expressions) differ in length between
    records."""

    KEYS = ("image", "caption", "question", "answer")

    def map(self, record: dict) -> dict:
        return {k: record[k] for k in self.KEYS}


class MakeDocument(grain.transforms.RandomMap):
    """A group of records -> ``{'tokens', 'weights'[, 'images']}`` (see the module doc)."""

    def __init__(self, tokenizer: SentencePieceTokenizer, max_length: int, max_images: int, *,
                 image_id: int | None, eoc_id: int | None, image_size: int | None,
                 docs_per_row: int = 1):
        self.tokenizer, self.max_length, self.max_images = tokenizer, max_length, max_images
        self.docs_per_row = docs_per_row
        self.image_id, self.eoc_id, self.image_size = image_id, eoc_id, image_size
        self._decode = DecodeImage()
        self._resize = ResizeCenterCrop(image_size) if image_size else None

    def random_map(self, records, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if isinstance(records, dict):  # grain batched the records feature by feature
            n_rec = len(next(iter(records.values())))
            records = [{k: v[i] for k, v in records.items()} for i in range(n_rec)]
        if self.docs_per_row > 1:
            return self._packed(records, rng)
        n = int(rng.integers(1, self.max_images + 1))
        chunks = document_texts(records[:n], rng)
        tokens, weights, kept = layout(chunks, self.tokenizer, self.max_length,
                                       image_id=self.image_id, eoc_id=self.eoc_id)
        out = {"tokens": tokens, "weights": weights}
        if self.image_id is not None:  # uint8, normalised on the device (as the CLIP batches)
            images = np.zeros((self.max_images, self.image_size, self.image_size, 3), np.uint8)
            for i in range(kept):
                example = self._decode.map({"image": records[i]["image"]})
                if self._resize is not None:
                    example = self._resize.map(example)
                images[i] = example["image"]
            out["images"] = images
        return out

    def _packed(self, records: list, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Text documents of consecutive record groups, concatenated and cut at max_length."""
        ids: list[int] = []
        weights: list[float] = []
        for d in range(self.docs_per_row):
            group = records[d * self.max_images:(d + 1) * self.max_images]
            n = int(rng.integers(1, self.max_images + 1))
            doc, w, _ = document_ids(document_texts(group[:n], rng), self.tokenizer, None,
                                     image_id=None, eoc_id=None)
            ids += doc
            weights += w
        tokens, w = np.asarray(ids), np.asarray(weights, np.float32)
        if len(tokens) < self.max_length:  # Rare short draws: padding, not a target.
            short = self.max_length - len(tokens)
            tokens = np.concatenate([tokens, np.full(short, self.tokenizer.pad_id)])
            w = np.concatenate([w, np.zeros(short, np.float32)])
        return {"tokens": tokens[:self.max_length].astype(np.int32),
                "weights": w[:self.max_length].astype(np.float32)}


def create_document_iterator(*, data_dir: str | os.PathLike | None, config_name: str,
                             split: str = "train", global_batch_size: int, seed: int,
                             tokenizer: SentencePieceTokenizer, max_length: int,
                             max_images: int = 5, image_id: int | None = None,
                             eoc_id: int | None = None, image_size: int | None = None,
                             docs_per_row: int = 1, process_index: int = 0,
                             process_count: int = 1, worker_count: int = 0
                             ) -> pipeline.StreamIterator:
    """Batches of documents of a shapes split for this process (checkpointable grain iterator,
    restartable at a global position on any process count: :class:`pipeline.StreamIterator`).

    ``image_id`` None: text-only documents ``{'tokens', 'weights'}`` for language-model
    pretraining; otherwise multimodal ones with ``'images' uint8 [B, max_images, S, S, 3]``
    (zeros after a document's last image; the ViT normalises them on the device). Row ``d`` of the global stream is made of records
    ``[d * G, (d + 1) * G)`` (``G = max_images * docs_per_row``) of the split shuffled with
    ``seed`` and its contents are fixed by ``(seed, d)``, so the global batches do not depend on
    the number of processes (process ``i`` of ``n`` builds rows ``d % n == i``).
    ``docs_per_row > 1`` packs text-only documents (see the module doc).
    """
    if docs_per_row > 1 and image_id is not None:
        raise DataError("Packing (docs_per_row > 1) is for text-only documents.")
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                        f"process count {process_count}.")
    if image_id is not None and not image_size:
        raise DataError("Multimodal documents need image_size.")
    source, _ = pipeline._data_source(data_dir, "shapes", config_name, split)  # pylint: disable=protected-access
    if len(source) < max_images:
        raise DataError(f"Split {split!r} has {len(source)} records, fewer than max_images="
                        f"{max_images}.")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(_DocumentFields())
    ds = ds.batch(max_images * docs_per_row, drop_remainder=True)
    ds = ds.random_map(MakeDocument(tokenizer, max_length, max_images, image_id=image_id,
                                    eoc_id=eoc_id, image_size=image_size,
                                    docs_per_row=docs_per_row), seed=seed)

    def build(start: int) -> grain.DatasetIterator:
        # Batched before the iterator, so that grain workers (worker_count > 0) each make
        # whole batches: batch t is this process's share of global batch t with any number of
        # workers and processes.
        part = ds[start + process_index::process_count].batch(
            global_batch_size // process_count, drop_remainder=True)
        it_ds = part.to_iter_dataset(pipeline._read_options())  # pylint: disable=protected-access
        return pipeline._iterate(it_ds, worker_count)  # pylint: disable=protected-access

    return pipeline.StreamIterator(build, global_batch_size=global_batch_size,
                                   process_index=process_index, process_count=process_count)


# -------------------------------------------------------------------------------------------
# Interleaved web documents (OBELICS / MMC4 layouts) in webdataset tar shards.
# -------------------------------------------------------------------------------------------
#
# A sample of a shard is one document: a ``<key>.json`` member describing it and its images as
# members of the same sample. Two public layouts are read (recognised by their keys):
#
# * OBELICS (HuggingFaceM4/OBELICS): ``texts`` and ``images``, lists of the same length where
#   each position holds a text (``images[i]`` null) or an image (``texts[i]`` null), in reading
#   order; ``images[i]`` is the image's URL or member name.
# * MMC4 (allenai/mmc4): ``text_list`` (the document's sentences) and ``image_info``, a list of
#   ``{'image_name', 'matched_text_index', 'matched_sim', ...}``: each image goes before the
#   sentence it was matched to (open_flamingo's placement), images matched to the same sentence
#   in ``image_info`` order. Images whose ``matched_sim`` is below ``min_similarity`` are left
#   out (open_flamingo's ``mmc4_textsim_threshold``).
#
# The image at position ``i`` (of ``images`` / ``image_info``) is, first match wins:
# ``image_info[i]['image_base64']`` (open_flamingo's MMC4 tars carry the bytes in the json), the
# member ``<key>.<i>.<ext>`` (``ext`` jpg / jpeg / png / webp), or the member named by the json
# (``<key>.<image_name>``, or the file name at the end of the URL). An image that is absent
# (failed download), does not decode, or is too small / too large is dropped from the document
# and counted (``SKIP_STATS``: ``dropped_images/<reason>``); a document is skipped (and counted,
# ``skipped/<reason>``) when its json is missing or unreadable (``bad_json``) or no image is left
# (``no_images``).
#
# Tokens (open_flamingo's layout, that of the shapes documents above): an image opens a chunk
# that runs to the next image, closed by ``<|endofchunk|>``; text before the first image is
# plain text::
#
#     [bos] t t <image> t t t <|endofchunk|> <image> t t <|endofchunk|> [eos] [pad ...]
#
# A document is cut before its ``max_images + 1``-th image and at ``max_length`` tokens (an
# ``<image>`` left with no token after it is removed with its image); ``weights``: texts,
# ``<|endofchunk|>`` and ``eos``.

def parse_document(raw: bytes | str | None, min_similarity: float = float("-inf")
                   ) -> tuple[str | None, list]:
    """``(skip reason or None, items)`` of one document json (OBELICS or MMC4 layout): items in
    reading order, a text (str) or an image reference ``(index, name, base64)``."""
    if raw is None:
        return "bad_json", []
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "bad_json", []
    if not isinstance(doc, dict):
        return "bad_json", []
    items: list = []
    if isinstance(doc.get("texts"), list) and isinstance(doc.get("images"), list):  # OBELICS
        texts, images = doc["texts"], doc["images"]
        if len(texts) != len(images):
            return "bad_json", []
        for i, (text, image) in enumerate(zip(texts, images)):
            if image is not None:
                items.append((i, str(image), None))
            elif isinstance(text, str) and text.strip():
                items.append(text)
        return None, items
    if isinstance(doc.get("text_list"), list) and isinstance(doc.get("image_info"), list):
        sentences = doc["text_list"]
        before: dict[int, list] = {}
        for i, info in enumerate(doc["image_info"]):
            if not isinstance(info, dict):
                return "bad_json", []
            j = info.get("matched_text_index")
            if not isinstance(j, int) or not 0 <= j < len(sentences):
                return "bad_json", []
            sim = info.get("matched_sim")
            if isinstance(sim, (int, float)) and sim < min_similarity:
                continue
            before.setdefault(j, []).append((i, str(info.get("image_name") or ""),
                                             info.get("image_base64")))
        for j, sentence in enumerate(sentences):
            items += before.get(j, [])
            if isinstance(sentence, str) and sentence.strip():
                items.append(sentence)
        return None, items
    return "bad_json", []


def _member_for(ref: tuple, members: Mapping[str, Any]) -> str | None:
    """The member (name after the sample key) that holds image ``ref`` (see above)."""
    index, name, _ = ref
    for member in members:
        head, _, ext = member.rpartition(".")
        if head == str(index) and ext in IMAGE_EXTENSIONS:
            return member
    name = name.lower()
    candidates = (name, name.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]) if name else ()
    return next((c for c in candidates if c in members), None)


def interleaved_ids(items: Sequence, tokenizer: SentencePieceTokenizer, max_length: int,
                    max_images: int, *, image_id: int, eoc_id: int,
                    load_image: Callable[[Any], np.ndarray | None] = lambda ref: ref
                    ) -> tuple[list[int], list[float], list]:
    """``(token ids, weights, images)`` of a parsed document (see above), unpadded, at most
    ``max_length`` tokens; ``load_image(ref)`` gives an image or None (dropped). Images are
    loaded in reading order and only while the document still has room."""
    sp = tokenizer._sp  # pylint: disable=protected-access
    ids, weights, images = [tokenizer.bos_id], [0.0], []
    is_open = False
    for item in items:
        if len(ids) >= max_length:
            break
        if isinstance(item, str):
            pieces = sp.encode(item)
            ids += pieces
            weights += [1.0] * len(pieces)
            continue
        if len(images) == max_images:
            break
        image = load_image(item)
        if image is None:
            continue
        if is_open:
            ids.append(eoc_id)
            weights.append(1.0)
        ids.append(image_id)
        weights.append(0.0)
        images.append(image)
        is_open = True
    if is_open:
        ids.append(eoc_id)
        weights.append(1.0)
    ids.append(tokenizer.eos_id)
    weights.append(1.0)
    ids, weights = ids[:max_length], weights[:max_length]
    while ids[-1] == image_id:  # An image with no token after it: nothing would attend to it.
        ids.pop()
        weights.pop()
    return ids, weights, images[:ids.count(image_id)]


class WebDatasetDocumentSource(sources.WebDatasetSource):
    """Interleaved documents of webdataset tar shards (see above): a record is ``{'key', 'json':
    bytes | None, 'images': ImageMembers}``; image members are read when a document uses them
    (a long document's images past ``max_images`` are never read)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, members = self._records[index]
        images = {m: member for m, member in members.items()
                  if m.rpartition(".")[2] in IMAGE_EXTENSIONS}
        return {"key": key, "json": self._read(members.get("json")),
                "images": ImageMembers(self, images)}

    def __repr__(self) -> str:
        return f"WebDatasetDocumentSource({len(self.paths)} shards, {len(self)} documents)"


@dataclasses.dataclass
class ImageMembers(Mapping):
    """The image members of one sample, read on access (``None``: truncated or removed)."""

    source: sources.WebDatasetSource
    members: dict

    def __getitem__(self, name: str) -> bytes | None:
        return self.source._read(self.members[name])  # pylint: disable=protected-access

    def __iter__(self):
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)


class DecodeDocument(grain.transforms.Map):
    """A document record -> ``{'tokens' int32 [T], 'weights' float32 [T], 'images' uint8
    [max_images, S, S, 3]}`` (images resized and centre-cropped to ``S``, zeros after the
    last), or ``{'_skip': reason}``; counted in :data:`SKIP_STATS`."""

    def __init__(self, tokenizer: SentencePieceTokenizer, max_length: int, max_images: int, *,
                 image_id: int, eoc_id: int, image_size: int, min_side: int = 8,
                 max_pixels: int = 8192 * 8192, min_similarity: float = float("-inf")):
        self.tokenizer, self.max_length, self.max_images = tokenizer, max_length, max_images
        self.image_id, self.eoc_id, self.image_size = image_id, eoc_id, image_size
        self.min_side, self.max_pixels, self.min_similarity = min_side, max_pixels, min_similarity
        self._resize = ResizeCenterCrop(image_size)

    def _load(self, ref: tuple, members: Mapping[str, Any]) -> np.ndarray | None:
        _, _, b64 = ref
        data = None
        if b64:
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                SKIP_STATS.drop_image("corrupt_image")
                return None
        else:
            member = _member_for(ref, members)
            data = members[member] if member is not None else None
        if not data:
            SKIP_STATS.drop_image("missing_image")
            return None
        reason, rgb = check_image(data, self.min_side, self.max_pixels)
        if reason is not None:
            SKIP_STATS.drop_image(reason)
            return None
        return self._resize.map({"image": rgb})["image"]

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        reason, items = parse_document(record["json"], self.min_similarity)
        images: list = []
        if reason is None:
            ids, weights, images = interleaved_ids(
                items, self.tokenizer, self.max_length, self.max_images, image_id=self.image_id,
                eoc_id=self.eoc_id, load_image=lambda ref: self._load(ref, record["images"]))
            if not images:
                reason = "no_images"
        SKIP_STATS.record(reason)
        if reason is not None:
            return {"_skip": reason, "key": record.get("key", "")}
        tokens = np.full((self.max_length,), self.tokenizer.pad_id, np.int32)
        tokens[:len(ids)] = ids
        w = np.zeros((self.max_length,), np.float32)
        w[:len(weights)] = weights
        pixels = np.zeros((self.max_images, self.image_size, self.image_size, 3), np.uint8)
        pixels[:len(images)] = images
        return {"tokens": tokens, "weights": w, "images": pixels}


def create_webdataset_document_iterator(
        source, *, tokenizer: SentencePieceTokenizer, max_length: int, max_images: int,
        image_id: int, eoc_id: int, image_size: int, global_batch_size: int, seed: int,
        process_index: int = 0, process_count: int = 1, worker_count: int = 0,
        min_side: int = 8, max_pixels: int = 8192 * 8192,
        min_similarity: float = float("-inf")) -> pipeline.StreamIterator:
    """Batches of Flamingo's ``{'tokens' int32 [B, T], 'weights' float32 [B, T], 'images'
    uint8 [B, max_images, S, S, 3]}`` from interleaved documents in webdataset shards
    (:class:`WebDatasetDocumentSource`, layouts above), one document per row.

    The stream and its sharding are those of the raw image-text pairs
    (:func:`pipeline.create_pair_iterator`): one stream shuffled from ``seed``, process ``i`` of
    ``n`` reads positions ``p % n == i``, skipped documents dropped before batching (so with
    bad documents a re-mapped resume is exact only up to the skipped ones, and grain workers
    make the stream non-positional; see :class:`pipeline.StreamIterator`).
    """
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                        f"process count {process_count}.")
    if len(source) < global_batch_size:
        raise DataError(f"{source!r} has {len(source)} documents, fewer than one global batch "
                        f"of {global_batch_size}.")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds.map(DecodeDocument(tokenizer, max_length, max_images, image_id=image_id,
                               eoc_id=eoc_id, image_size=image_size, min_side=min_side,
                               max_pixels=max_pixels, min_similarity=min_similarity))
    ds = ds.filter(KeepValid()).map_with_index(pipeline._WithPosition())  # pylint: disable=protected-access

    def build(start: int) -> grain.DatasetIterator:
        part = ds[start + process_index::process_count]
        it_ds = part.to_iter_dataset(pipeline._read_options()).batch(  # pylint: disable=protected-access
            global_batch_size // process_count, drop_remainder=True)
        return pipeline._iterate(it_ds, worker_count)  # pylint: disable=protected-access

    return pipeline.StreamIterator(build, global_batch_size=global_batch_size,
                                   process_index=process_index, process_count=process_count,
                                   tracks_positions=True, positional=worker_count == 0)


if __name__ == "__main__":  # python -m input_pipeline.interleaved: rebuild the shipped tokenizer
    print(write_lm_tokenizer())
