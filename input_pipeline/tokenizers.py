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

# Special ids of every sentencepiece model trained by :func:`train_sentencepiece`.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


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
        ids = tokens.tolist()
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode([i for i in ids if i not in (self.bos_id, self.pad_id)])

    def content_lengths(self, tokens: np.ndarray) -> np.ndarray:
        """Number of text tokens (not bos/eos/pad) per row of int [..., L]; 0 = empty caption."""
        tokens = np.asarray(tokens)
        special = (tokens == self.pad_id) | (tokens == self.bos_id) | (tokens == self.eos_id)
        return np.sum(~special, axis=-1)


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
