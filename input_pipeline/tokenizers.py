"""Text tokenizers producing fixed-length int32 token arrays.

Token layout (as open_clip): ``[bos] + pieces + [eos] + [pad] * n``, truncated to
``context_length`` so that the last real token is always ``eos``. Text towers pool at the
eos position, ``argmax(tokens == eos_id)``; an empty caption encodes to ``[bos, eos, pad...]``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from input_pipeline import DataError

# OpenAI CLIP's BPE merges (MIT licence, as shipped with OpenAI CLIP and open_clip); configs name
# it ``tokenizer='clip_bpe'``.
CLIP_BPE_PATH = os.path.join(os.path.dirname(__file__), "assets", "bpe_simple_vocab_16e6.txt.gz")

# Special ids of every sentencepiece model trained by :func:`train_sentencepiece`.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _before_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
    """The ids of one row up to (not including) its first eos."""
    ids = tokens.tolist()
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


class SentencePieceTokenizer:
    """Sentencepiece tokenizer with bos/eos framing, truncation and padding to a fixed length.

    The model must define pad=0 and bos/eos tokens (as :func:`train_sentencepiece` does).
    Instances pickle (the model bytes travel with them), so they work in grain worker processes.
    """

    def __init__(self, model_path: str | os.PathLike, context_length: int = 77):
        """Loads the model.

        Args:
            model_path: path of a sentencepiece ``.model`` file (local or any etils path).
            context_length: length L of every encoded sequence, >= 2 (bos and eos).

        Raises:
            DataError: the file is missing or not a usable sentencepiece model.
        """
        path = epath.Path(model_path)
        if not path.exists():
            raise DataError(
                f"Tokenizer model {path} does not exist. For the shapes dataset it is written "
                "when the dataset is built: run input_pipeline.shapes.prepare(data_dir=...)."
            )
        if context_length < 2:
            raise DataError(f"context_length={context_length} must be >= 2 (bos and eos).")
        self._model_path = str(path)
        self._context_length = context_length
        self._load(path.read_bytes())

    @property
    def path(self) -> str:
        """The ``.model`` file this tokenizer was read from."""
        return self._model_path

    def _load(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise DataError(
                f"{self._model_path} is not a sentencepiece model ({e}). Rebuild it, e.g. "
                "delete the dataset directory and run input_pipeline.shapes.prepare()."
            ) from e
        if self._sp.pad_id() != PAD_ID or self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise DataError(
                f"Sentencepiece model {self._model_path} has pad={self._sp.pad_id()}, "
                f"bos={self._sp.bos_id()}, eos={self._sp.eos_id()}; vlm_jax needs pad=0 and "
                "bos/eos defined. Train it with input_pipeline.tokenizers.train_sentencepiece."
            )

    def __getstate__(self) -> dict:
        return {"model_path": self._model_path, "context_length": self._context_length,
                "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self._model_path = state["model_path"]
        self._context_length = state["context_length"]
        self._load(state["proto"])

    @property
    def context_length(self) -> int:
        """Length L of encoded sequences."""
        return self._context_length

    @property
    def vocab_size(self) -> int:
        """Number of token ids (size of the embedding table)."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """Id used after eos (always 0)."""
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        """Id of the first token of every sequence."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of the last real token of every sequence (the text-pooling position)."""
        return self._sp.eos_id()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes texts to int32 [len(texts), context_length].

        Each row is ``[bos] + pieces + [eos]`` followed by pad (0). Longer sequences are cut to
        ``context_length`` and their last position set to eos, so every row holds exactly one eos.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings; wrap a single text in a list.")
        out = np.full((len(texts), self._context_length), self.pad_id, np.int32)
        # One call per text: sentencepiece's batch encode starts threads (~30x slower here).
        for row, text in zip(out, texts):
            pieces = self._sp.encode(text)
            ids = [self.bos_id, *pieces, self.eos_id][: self._context_length]
            ids[-1] = self.eos_id
            row[: len(ids)] = ids
        return out

    def decode(self, tokens: np.ndarray | Sequence[int]) -> str | list[str]:
        """Decodes one sequence [L] to a string, or a batch [n, L] to a list of strings.

        Decoding stops at the first eos; bos and pad are dropped.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim == 2:
            return [self.decode(row) for row in tokens]
        ids = _before_eos(tokens, self.eos_id)
        # Ids past the vocabulary (a model's embedding table may be larger) decode to nothing.
        return self._sp.decode([i for i in ids if i not in (self.bos_id, self.pad_id)
                                and 0 <= i < self.vocab_size])

    def content_lengths(self, tokens: np.ndarray) -> np.ndarray:
        """Number of text tokens (not bos/eos/pad) per row of int [..., L]; 0 = empty caption."""
        tokens = np.asarray(tokens)
        special = (tokens == self.pad_id) | (tokens == self.bos_id) | (tokens == self.eos_id)
        return np.sum(~special, axis=-1)


# -------------------------------------------------------------------------------------------
# CLIP's byte-level BPE (OpenAI CLIP / open_clip ``SimpleTokenizer``).
# -------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character map (as GPT-2's)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clean(text: str) -> str:
    """CLIP's ``basic_clean`` + ``whitespace_clean`` + lower-casing. ``ftfy.fix_text`` is applied
    when ftfy is installed (it repairs mojibake; the rest is identical without it)."""
    import html  # pylint: disable=import-outside-toplevel

    try:
        import ftfy  # pylint: disable=import-outside-toplevel

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipBpeTokenizer:
    """OpenAI CLIP's BPE tokenizer, read from the standard ``bpe_simple_vocab_16e6.txt.gz``.

    Written out rather than taken from a library because it must reproduce OpenAI's
    ``simple_tokenizer.py`` token for token (ids of public CLIP checkpoints depend on it) from
    that one file; HF ``tokenizers`` needs the vocabulary converted to its own JSON first and is
    not otherwise a dependency. Vocabulary: 256 byte symbols, the same with ``</w>``, one
    entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (49406 and 49407 for the
    standard file). Rows are ``[sot] + tokens + [eot]`` padded with 0 and cut to
    ``context_length`` with ``eot`` last, as open_clip's ``tokenize``.
    """

    _PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                r"[\p{N}]|[^\s\p{L}\p{N}]+")

    def __init__(self, bpe_path: str | os.PathLike, context_length: int = 77,
                 max_merges: int = 49152 - 256 - 2):
        import gzip  # pylint: disable=import-outside-toplevel

        path = epath.Path(bpe_path)
        if not path.exists():
            raise DataError(f"CLIP BPE file {path} does not exist (bpe_simple_vocab_16e6.txt.gz "
                            "ships with OpenAI's CLIP and open_clip).")
        if context_length < 2:
            raise DataError(f"context_length={context_length} must be >= 2 (sot and eot).")
        try:
            raw = path.read_bytes()
            lines = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise DataError(f"{path} is not a CLIP BPE merges file ({e}).") from e
        merges = [tuple(m.split()) for m in lines.split("\n")[1:max_merges + 1] if m.strip()]
        if any(len(m) != 2 for m in merges):
            raise DataError(f"{path}: every line after the header must be one merge 'a b'.")
        self._path, self._state = str(path), (lines, context_length, max_merges)
        self._build(merges, context_length)

    @property
    def path(self) -> str:
        """The merges file this tokenizer was read from."""
        return self._path

    def _build(self, merges, context_length):
        import regex  # pylint: disable=import-outside-toplevel

        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.decoder = {i: v for v, i in self.encoder.items()}
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self._pattern = regex.compile(self._PATTERN, regex.IGNORECASE)
        self._cache: dict[str, list[int]] = {}
        self._context_length = context_length

    def __getstate__(self):
        return {"path": self._path, "state": self._state}

    def __setstate__(self, d):
        lines, context_length, max_merges = d["state"]
        self._path, self._state = d["path"], d["state"]
        merges = [tuple(m.split()) for m in lines.split("\n")[1:max_merges + 1] if m.strip()]
        self._build(merges, context_length)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def bos_id(self) -> int:
        return self.encoder["<|startoftext|>"]

    @property
    def eos_id(self) -> int:
        return self.encoder["<|endoftext|>"]

    pad_id = 0

    def _bpe(self, token: str) -> list[int]:
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids = [self.encoder[w] for w in word]
        self._cache[token] = ids
        return ids

    def tokens(self, text: str) -> list[int]:
        """BPE ids of one text, without sot/eot."""
        return self.tokens_of_clean(_clean(text))

    def tokens_of_clean(self, text: str) -> list[int]:
        """BPE ids of an already cleaned (lower-cased) text, without sot/eot."""
        out: list[int] = []
        for token in self._pattern.findall(text):
            out += self._bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8")))
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), context_length]: ``[sot] + tokens + [eot]``, 0-padded, truncated
        with ``eot`` kept last."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings; wrap a single text in a list.")
        out = np.zeros((len(texts), self._context_length), np.int32)
        for row, text in zip(out, texts):
            ids = [self.bos_id, *self.tokens(text), self.eos_id][: self._context_length]
            ids[-1] = self.eos_id
            row[: len(ids)] = ids
        return out

    def decode(self, tokens) -> str | list[str]:
        """Text of one row (up to eot; sot and padding dropped) or of a batch of rows."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 2:
            return [self.decode(r) for r in tokens]
        ids = _before_eos(tokens, self.eos_id)
        text = "".join(self.decoder[i] for i in ids if i != self.bos_id and i in self.decoder)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()


# -------------------------------------------------------------------------------------------
# Tokenizers of imported Hugging Face CLIP / SigLIP / SigLIP 2 models.
# -------------------------------------------------------------------------------------------

HF_SPEC_NAME = "tokenizer_spec.json"


def _lower_chars(text: str) -> str:
    """Lower-cases character by character, as the ``tokenizers`` library's ``Lowercase``
    normaliser does: no context, so a word-final capital sigma becomes ``σ``, where
    ``str.lower`` gives ``ς``."""
    return "".join(c.lower() for c in text)


class HfTextTokenizer:
    """The tokenizer of an imported Hugging Face ``CLIPModel`` / ``SiglipModel`` /
    ``Siglip2Model``: the ids that ``tokenizer(texts, padding='max_length', truncation=True,
    max_length=context_length)`` of its transformers tokenizer gives, from a small JSON spec
    (written by :mod:`vlm_jax.interop_hf`, next to the vocabulary file it names):

    * ``kind``: ``'clip_bpe'`` (``model``: the ``merges.txt``; text NFC-normalised, whitespace
      collapsed, lower-cased, as ``CLIPTokenizer``: no ftfy / HTML unescaping, unlike
      OpenAI's tokenizer) or ``'sentencepiece'`` (``model``: ``spiece.model`` /
      ``tokenizer.model``, read with the sentencepiece library itself).
    * ``lower``: lower-case first; ``strip_punctuation``: SigLIP's ``canonicalize_text``
      (ASCII punctuation removed, whitespace collapsed and stripped).
    * ``bos_id`` / ``eos_id`` (null: not added), ``pad_id``, ``padding_side`` (``'right'`` /
      ``'left'``). Text longer than ``context_length`` is cut so that bos / eos stay, as
      transformers truncates.

    The framing is done here rather than with the ``tokenizers`` library because vlm_jax does
    not otherwise depend on it; ``tests/test_hf_clip_import.py`` checks the ids against
    transformers' on tricky strings.
    """

    def __init__(self, spec_path: str | os.PathLike, context_length: int | None = None):
        import json  # pylint: disable=import-outside-toplevel

        path = epath.Path(spec_path)
        if not path.exists():
            raise DataError(f"Tokenizer spec {path} does not exist (vlm-jax convert writes it "
                            "into <workdir>/tokenizer/ when importing a Hugging Face model).")
        spec = json.loads(path.read_text())
        missing = {"kind", "model", "pad_id"} - set(spec)
        if missing or spec["kind"] not in ("clip_bpe", "sentencepiece"):
            raise DataError(f"{path} is not a tokenizer spec: needs kind 'clip_bpe' or "
                            f"'sentencepiece', model and pad_id (missing {sorted(missing)}).")
        self.spec = spec
        self._path = str(path)
        self._context_length = int(context_length or spec.get("context_length") or 64)
        model = path.parent / spec["model"]
        if spec["kind"] == "clip_bpe":
            self._bpe = ClipBpeTokenizer(model, self._context_length, max_merges=10**9)
            self._vocab_size = self._bpe.vocab_size
        else:
            if not model.exists():
                raise DataError(f"{path} names the sentencepiece model {model}, which does not "
                                "exist.")
            self._sp = spm.SentencePieceProcessor(model_proto=model.read_bytes())
            self._vocab_size = self._sp.get_piece_size()
        self._vocab_size = max(self._vocab_size, int(spec.get("vocab_size", 0)))

    def __getstate__(self):
        return {"path": self._path, "context_length": self._context_length}

    def __setstate__(self, d):
        self.__init__(d["path"], d["context_length"])

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self.spec.get("bos_id")

    @property
    def eos_id(self) -> int | None:
        return self.spec.get("eos_id")

    @property
    def pad_id(self) -> int:
        return int(self.spec["pad_id"])

    def pieces(self, text: str) -> list[int]:
        """The ids of one text, without bos / eos."""
        import re  # pylint: disable=import-outside-toplevel
        import string  # pylint: disable=import-outside-toplevel
        import unicodedata  # pylint: disable=import-outside-toplevel

        if self.spec["kind"] == "clip_bpe":
            return self._bpe.tokens_of_clean(
                _lower_chars(" ".join(unicodedata.normalize("NFC", text).split())))
        if not self.spec.get("strip_punctuation"):
            return self._sp.encode(_lower_chars(text) if self.spec.get("lower") else text)
        # SiglipTokenizer: "▁" + text, canonicalize_text (lower-case, punctuation removed,
        # whitespace collapsed and stripped), then the pieces of unk + text without unk's
        # (so that sentencepiece adds no dummy prefix).
        text = "\u2581" + text.replace("\u2581", " ")
        if self.spec.get("lower"):
            text = text.lower()
        text = text.translate(str.maketrans("", "", string.punctuation))
        text = re.sub(r"\s+", " ", text).strip()
        unk = self._sp.id_to_piece(self._sp.unk_id())
        ids = self._sp.encode(unk + text)
        n = len(self._sp.encode(unk))
        return ids[n:] if len(ids) >= n else ids

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 ``[len(texts), context_length]``."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings; wrap a single text in a list.")
        length = self._context_length
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.eos_id is None else [self.eos_id]
        room = length - len(head) - len(tail)
        out = np.full((len(texts), length), self.pad_id, np.int32)
        for row, text in zip(out, texts):
            ids = head + self.pieces(text)[:max(room, 0)] + tail
            ids = ids[:length]
            if self.spec.get("padding_side", "right") == "left":
                row[length - len(ids):] = ids
            else:
                row[:len(ids)] = ids
        return out

    def decode(self, tokens) -> str | list[str]:
        """Text of one row (special ids dropped) or of a batch of rows."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 2:
            return [self.decode(r) for r in tokens]
        special = {self.bos_id, self.eos_id, self.pad_id}
        ids = [int(i) for i in tokens if int(i) not in special and 0 <= i < self.vocab_size]
        if self.spec["kind"] == "clip_bpe":
            return self._bpe.decode(np.asarray([*ids, self._bpe.eos_id]))
        return self._sp.decode(ids)


def load_tokenizer(path: str | os.PathLike, context_length: int = 77):
    """A CLIP BPE (``*.txt.gz`` / ``*.txt`` merges file; ``'clip_bpe'`` for OpenAI's, which
    ships with vlm_jax), sentencepiece (``*.model``) or imported Hugging Face
    (``tokenizer_spec.json``, :class:`HfTextTokenizer`) tokenizer, chosen by the file name."""
    name = os.fspath(path)
    if name.endswith(".json"):
        return HfTextTokenizer(name, context_length)
    if name == "clip_bpe":
        name = CLIP_BPE_PATH
    if name.endswith((".txt.gz", ".txt")):
        return ClipBpeTokenizer(name, context_length)
    return SentencePieceTokenizer(name, context_length)


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike,
                        vocab_size: int) -> str:
    """Trains a BPE sentencepiece model with pad=0, unk=1, bos=2, eos=3.

    BPE keeps the frequent words of a small closed vocabulary (like the shapes captions) whole,
    and spells unseen words with characters. ``vocab_size`` is an upper bound
    (``hard_vocab_limit=False``). Training is single-threaded and the model is written from
    memory, so the same texts give the same model bytes.

    Args:
        texts: training sentences.
        model_prefix: output path without extension; any etils path (e.g. ``gs://``).
        vocab_size: maximum vocabulary size.

    Returns:
        Path of the written ``.model`` file, ``f"{model_prefix}.model"``.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=1,
        minloglevel=2,
    )
    out = epath.Path(f"{os.fspath(model_prefix)}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return os.fspath(out)
