"""LocCa: a SigLIP / CLIP dual encoder with a location-aware captioning decoder.

SigLIP 2 (Tschannen et al., arXiv 2502.14786, Sec. 2.2) trains its image tower jointly with the
sigmoid loss and with LocCa's decoder (Wan et al., "LocCa: Visual Pretraining with
Location-aware Captioners", arXiv 2403.19596): a transformer decoder cross-attending to the
image tower's *un-pooled* output tokens, trained on three tasks written as token sequences:

* **Cap**, captioning: ``caption eos``;
* **ARef**, automatic referring expression: ``<aref> expression <sep> box eos`` (the box of the
  region an expression names);
* **GCap**, grounded captioning: ``<gcap> box <sep> caption eos`` (the caption of a box).

A box is four tokens, its ``(ymin, xmin, ymax, xmax)`` (fractions of the image side, the TFDS
convention of the shapes records) each quantised into ``num_bins`` bins that extend the text
vocabulary (:class:`TokenLayout`). The decoder starts every sequence from ``bos``, so the
plain caption prompt is ``bos`` alone, as CoCa's, and the captioning evaluator needs nothing
special. The expression of an ARef prompt is a field of fixed width (``expression_length``
tokens, padded), so that every ARef prompt has one length: the decoder's positions are
absolute (as CoCa's), and :func:`vlm_jax.decoding.greedy` decodes prompts of one length.

The decoder *is* CoCa's: :class:`vlm_jax.models.coca.MultimodalDecoder` (causal self-attention,
cross-attention, MLP per layer, on the one attention module and layer stack) behind its own
token and position embeddings, with CoCa's cache layout for decoding. What LocCa adds is the
task sequences, the box tokens and CapPa's parallel prediction (Tschannen et al., "Image
Captioners Are Scalable Vision Learners Too", arXiv 2306.07915; big_vision
``models/proj/cappa/cappa.py``): for a fraction of the examples the decoder sees a ``mask``
token in place of every target input and attends both ways, predicting all targets at once.

Config: the CLIP model's (:class:`vlm_jax.models.clip.CLIP`) plus ``decoder``::

    model = dict(name='locca', ..., decoder=dict(
        width=128, depth=2, num_heads=4, mlp_dim=512, num_bins=64, expression_length=12,
        max_length=24, bos_id=2, act='gelu', ln_eps=1e-5))

``width`` / ``num_heads`` / ``mlp_dim`` default to the text tower's, ``depth`` to half of it
(SigLIP 2: a decoder with fewer layers than the text tower), ``num_bins`` to 500,
``expression_length`` to 12 and ``max_length`` to the text ``context_length``; ``bos_id`` (the
tokenizer's) is required; ``eos_id`` / ``pad_id`` are ``model.text``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.models import layers
from vlm_jax.models.clip import (CLIP, _TOP_KEYS as _CLIP_KEYS, check_keys, clip_flops,
                                 from_config_dict, to_plain_dict)
from vlm_jax.models.coca import MultimodalDecoder, reorder_cache
from vlm_jax.models.vit import has_cls_token, resolve_dims
from vlm_jax.parallel import constrain

TASKS = ("cap", "aref", "gcap")
_X = ("act_batch", "act_len", "act_embed")


# -------------------------------------------------------------------------------------------
# Token layout and boxes.
# -------------------------------------------------------------------------------------------


def quantize_boxes(boxes, num_bins: int):
    """Box coordinates in ``[0, 1]`` -> bin indices ``floor(v * num_bins)`` clipped to
    ``[0, num_bins - 1]`` (int32; numpy in, numpy out; jax in, jax out)."""
    xp = jnp if isinstance(boxes, jax.Array) else np
    return xp.clip(xp.floor(xp.asarray(boxes) * num_bins), 0, num_bins - 1).astype(xp.int32)


def dequantize_boxes(bins, num_bins: int):
    """Bin indices -> the bins' centres ``(bin + 0.5) / num_bins`` (float32)."""
    xp = jnp if isinstance(bins, jax.Array) else np
    return ((xp.asarray(bins).astype(xp.float32) + 0.5) / num_bins).astype(xp.float32)


def text_pieces(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The text ids of ``texts`` without the tokenizer's bos / eos / padding (cut at its
    context length)."""
    out = []
    for row in np.asarray(tokenizer.encode(list(texts))):
        ids = [int(t) for t in row]
        if ids and ids[0] == tokenizer.bos_id:
            ids = ids[1:]
        if tokenizer.eos_id in ids:
            ids = ids[:ids.index(tokenizer.eos_id)]
        out.append([t for t in ids if t != tokenizer.pad_id])
    return out


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """The decoder's vocabulary: the text tokenizer's ``text_vocab`` ids, then the task tokens
    ``<aref>`` ``<gcap>``, the separator ``<sep>``, ``num_bins`` box tokens and the ``<mask>``
    input of parallel prediction.

    Sequences are ``max_length`` tokens, the labels of a decoder that reads ``bos`` then the
    labels shifted by one (so ``max_length`` decoder positions): see :meth:`sequence`.
    """

    text_vocab: int
    num_bins: int
    expression_length: int
    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int = 0

    @property
    def aref_id(self) -> int:
        """The ARef task token."""
        return self.text_vocab

    @property
    def gcap_id(self) -> int:
        """The GCap task token."""
        return self.text_vocab + 1

    @property
    def sep_id(self) -> int:
        """Ends a prompt field (expression or box)."""
        return self.text_vocab + 2

    @property
    def box_start(self) -> int:
        """The id of bin 0; bin ``k`` is ``box_start + k``."""
        return self.text_vocab + 3

    @property
    def mask_id(self) -> int:
        """The input token of parallel prediction (never a label)."""
        return self.box_start + self.num_bins

    @property
    def vocab_size(self) -> int:
        """Decoder vocabulary (embedding rows and logits)."""
        return self.mask_id + 1

    @property
    def aref_prompt_length(self) -> int:
        """Labels before the box of an ARef sequence: task, expression field, sep."""
        return self.expression_length + 2

    def box_tokens(self, box) -> np.ndarray:
        """A box ``(ymin, xmin, ymax, xmax)`` -> its four token ids."""
        return self.box_start + quantize_boxes(np.asarray(box, np.float32), self.num_bins)

    def tokens_to_boxes(self, tokens):
        """Box token ids ``[..., 4]`` -> boxes (bin centres); ids outside the box range are
        clipped to the nearest bin."""
        xp = jnp if isinstance(tokens, jax.Array) else np
        bins = xp.clip(tokens - self.box_start, 0, self.num_bins - 1)
        return dequantize_boxes(bins, self.num_bins)

    def expression_field(self, pieces: Sequence[int]) -> list[int]:
        """An expression's text pieces cut / padded to ``expression_length``."""
        pieces = list(pieces)[:self.expression_length]
        return pieces + [self.pad_id] * (self.expression_length - len(pieces))

    def sequence(self, task: str, pieces: Sequence[int], box=None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int32 [max_length], target bool [max_length])`` of one example.

        ``pieces``: the caption's / expression's text ids (no bos / eos); ``box`` for ARef and
        GCap. ``target`` marks the labels scored (after the prompt, ``eos`` included). A
        caption too long for the sequence is cut (its ``eos`` kept).
        """
        if task == "cap":
            prompt, text = [], list(pieces)
        elif task == "aref":
            prompt = [self.aref_id, *self.expression_field(pieces), self.sep_id]
            text = [int(t) for t in self.box_tokens(box)]
        elif task == "gcap":
            prompt = [self.gcap_id, *[int(t) for t in self.box_tokens(box)], self.sep_id]
            text = list(pieces)
        else:
            raise ValueError(f"Unknown LocCa task {task!r}; use one of {TASKS}.")
        room = self.max_length - len(prompt) - 1
        if room < (4 if task == "aref" else 1):
            raise ValueError(f"model.decoder.max_length={self.max_length} leaves no room for "
                             f"the {task!r} target after its prompt of {len(prompt)} tokens.")
        ids = prompt + text[:room] + [self.eos_id]
        labels = np.full(self.max_length, self.pad_id, np.int32)
        labels[:len(ids)] = ids
        target = np.zeros(self.max_length, np.bool_)
        target[len(prompt):len(ids)] = True
        return labels, target

    def aref_prompts(self, expression_pieces: Sequence[Sequence[int]]) -> np.ndarray:
        """Decoding prompts ``bos <aref> expression <sep>`` int32 ``[N, expression_length
        + 3]``, one length for every expression."""
        return np.array([[self.bos_id, self.aref_id, *self.expression_field(p), self.sep_id]
                         for p in expression_pieces], np.int32).reshape(
                             len(expression_pieces), self.expression_length + 3)


# -------------------------------------------------------------------------------------------
# The decoder.
# -------------------------------------------------------------------------------------------


def shift_right(labels: jax.Array, bos_id: int) -> jax.Array:
    """``[bos, labels[:, :-1]]``: the decoder's teacher-forcing inputs."""
    bos = jnp.full(labels.shape[:1] + (1,), bos_id, labels.dtype)
    return jnp.concatenate([bos, labels[:, :-1]], axis=1)


class LocCaDecoder(nnx.Module):
    """Token + learned position embeddings, then CoCa's :class:`MultimodalDecoder` over the
    image tokens (the vocabulary projection is its ``vocab_projection``).

    Params: ``token_embed.embedding [vocab, width]``, ``pos_embed [max_length, width]``,
    ``decoder.*`` (:class:`MultimodalDecoder`).
    """

    def __init__(self, *, layout: TokenLayout, width: int, context_width: int, depth: int,
                 num_heads: int, mlp_dim: int, act: str = "gelu", ln_eps: float = 1e-5,
                 dtype: layers.Dtype = "float32", remat: str = "none",
                 scan_layers: bool = False, rngs: nnx.Rngs):
        self.layout = layout
        self.width, self.max_length = int(width), int(layout.max_length)
        self.dtype = layers.as_dtype(dtype)
        self.token_embed = layers.Embed(layout.vocab_size, width, dtype=dtype, rngs=rngs)
        self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.01),
                                      (self.max_length, width), ("pos", "embed"))
        self.decoder = MultimodalDecoder(width=width, context_width=context_width,
                                         vocab_size=layout.vocab_size, depth=depth,
                                         num_heads=num_heads, mlp_dim=mlp_dim, act=act,
                                         ln_eps=ln_eps, dtype=dtype, remat=remat,
                                         scan_layers=scan_layers, rngs=rngs)

    def embed(self, tokens: jax.Array, start: Any = 0) -> jax.Array:
        """Token + position embeddings of ``tokens [B, T]`` at positions ``start + arange(T)``."""
        t = tokens.shape[1]
        if isinstance(start, int) and start + t > self.max_length:
            raise ValueError(f"LocCa decoder: {start + t} positions exceed "
                             f"model.decoder.max_length={self.max_length}.")
        pos = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, t, 0)
        return constrain(self.token_embed(tokens) + pos.astype(self.dtype), *_X)

    def __call__(self, context: jax.Array, inputs: jax.Array,
                 bidirectional: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, vocab]`` (float32) of ``inputs [B, T]`` over ``context [B, N, C]``;
        rows where ``bidirectional [B]`` is True attend both ways (parallel prediction), the
        others causally."""
        t = inputs.shape[1]
        mask = None
        if bidirectional is not None:
            causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
            mask = (causal[None] | bidirectional[:, None, None])[:, None]
        return self.decoder(context, self.embed(inputs), mask=mask)


def decoder_inputs(labels: jax.Array, target: jax.Array, parallel: jax.Array,
                   layout: TokenLayout) -> jax.Array:
    """The decoder's inputs for ``labels`` / ``target`` ``[B, L]``: ``bos`` + the labels
    shifted right (teacher forcing); in rows with ``parallel [B]`` every position after the
    prompt reads ``<mask>`` instead (CapPa: the targets are predicted from the image and the
    prompt alone; big_vision masks all inputs, masking_ratio 1.0)."""
    inputs = shift_right(labels, layout.bos_id)
    after_prompt = jnp.cumsum(target.astype(jnp.int32), axis=1) > 0
    hide = parallel[:, None] & shift_right(after_prompt, False)
    return jnp.where(hide, layout.mask_id, inputs)


def sequence_loss(logits: jax.Array, labels: jax.Array, target: jax.Array) -> jax.Array:
    """Cross-entropy of ``labels`` under ``logits [B, L, V]``, a mean over the ``target``
    positions of the (micro-)batch (0 without any); float32 scalar."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = target.astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


# -------------------------------------------------------------------------------------------
# The model.
# -------------------------------------------------------------------------------------------

_TOP_KEYS = _CLIP_KEYS | {"decoder"}
_DECODER_KEYS = {"width", "depth", "num_heads", "mlp_dim", "num_bins", "expression_length",
                 "max_length", "bos_id", "act", "ln_eps"}


def decoder_settings(model_cfg: Any) -> dict:
    """``model.decoder`` with its defaults (see the module docstring), keys checked."""
    cfg = to_plain_dict(model_cfg)
    dec = dict(cfg.get("decoder") or {})
    check_keys(dec, _DECODER_KEYS, "model.decoder")
    text = cfg["text"]
    dec.setdefault("width", text["width"])
    dec.setdefault("num_heads", text["num_heads"])
    dec.setdefault("mlp_dim", text["mlp_dim"])
    dec.setdefault("depth", max(1, text["depth"] // 2))
    dec.setdefault("num_bins", 500)
    dec.setdefault("expression_length", 12)
    dec.setdefault("max_length", text["context_length"])
    dec.setdefault("act", text.get("act", "gelu"))
    dec.setdefault("ln_eps", 1e-5)
    return dec


def token_layout(model_cfg: Any) -> TokenLayout:
    """The decoder's :class:`TokenLayout` of a model config: ``model.decoder.bos_id`` (the
    tokenizer's bos; the text tower has none), ``model.text.eos_id`` / ``pad_id`` (default 0).

    Raises:
        ValueError: ``model.decoder.bos_id`` is not set.
    """
    cfg = to_plain_dict(model_cfg)
    dec, text = decoder_settings(cfg), cfg["text"]
    if dec.get("bos_id") is None:
        raise ValueError("model.decoder.bos_id is not set: the tokenizer's bos id, which starts "
                         "every decoder sequence (2 for the shapes tokenizer).")
    return TokenLayout(text_vocab=int(text["vocab_size"]), num_bins=int(dec["num_bins"]),
                       expression_length=int(dec["expression_length"]),
                       max_length=int(dec["max_length"]), bos_id=int(dec["bos_id"]),
                       eos_id=int(text["eos_id"]), pad_id=int(text.get("pad_id", 0)))


class LocCa(CLIP):
    """:class:`~vlm_jax.models.clip.CLIP` (or SigLIP) plus ``decoder``
    (:class:`LocCaDecoder`) over the image tower's output tokens, and the decoding protocol of
    :mod:`vlm_jax.decoding` on it (captions from ``bos``; boxes from ARef prompts,
    :class:`BoxReadout`). The decoder is used in training only; the encoders are CLIP's."""

    def __init__(self, *, decoder: Mapping | None = None, rngs: nnx.Rngs, **clip_kwargs):
        super().__init__(**clip_kwargs, rngs=rngs)
        t = self.text
        cfg = {"text": {**dict(clip_kwargs["text"]), "width": t.width, "depth": t.depth,
                        "num_heads": t.num_heads, "mlp_dim": t.mlp_dim,
                        "vocab_size": t.vocab_size, "context_length": t.context_length},
               "decoder": dict(decoder or {})}
        dec = decoder_settings(cfg)
        self.layout = token_layout(cfg)
        shared = {k: clip_kwargs.get(k, d) for k, d in
                  (("dtype", "float32"), ("remat", "none"), ("scan_layers", False))}
        self.decoder = LocCaDecoder(layout=self.layout, width=dec["width"],
                                    context_width=self.image.width, depth=dec["depth"],
                                    num_heads=dec["num_heads"], mlp_dim=dec["mlp_dim"],
                                    act=dec["act"], ln_eps=dec["ln_eps"], **shared, rngs=rngs)

    @classmethod
    def from_config(cls, cfg: Any, *, rngs: nnx.Rngs) -> "LocCa":
        """Builds from a model config dict / ConfigDict (see the module docstring)."""
        return from_config_dict(cls, cfg, _TOP_KEYS, rngs=rngs)

    def image_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(image_emb [B, D] normalised float32, tokens [B, T, width])`` from one pass of
        the image tower: the embedding of :meth:`encode_image` and the un-pooled output tokens
        (after the tower's final LayerNorm; its class token too when it has one) that the
        decoder reads."""
        tokens = self.image.encode_tokens(images)
        x = self.image.pool(tokens)
        if self.image_projection is not None:
            x = self.image_projection(x)
        return layers.l2_normalize(x), tokens

    def decoder_logits(self, context: jax.Array, labels: jax.Array, target: jax.Array,
                       parallel: jax.Array) -> jax.Array:
        """Teacher-forcing logits ``[B, L, vocab]`` of the label sequences (see
        :func:`decoder_inputs`)."""
        inputs = decoder_inputs(labels, target, parallel, self.layout)
        return self.decoder(context, inputs, bidirectional=parallel)

    # The decoding protocol (vlm_jax.decoding), CoCa's cache layout without the text tower.
    @property
    def bos_id(self) -> int:
        """Every decoder sequence starts here (alone: the caption prompt)."""
        return self.layout.bos_id

    @property
    def eos_id(self) -> int:
        """Ends a target."""
        return self.layout.eos_id

    @property
    def pad_id(self) -> int:
        """Padding (text tower's)."""
        return self.layout.pad_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """``(eos_id,)``."""
        return (self.layout.eos_id,)

    @property
    def context_length(self) -> int:
        """Decoder positions (``model.decoder.max_length``)."""
        return self.decoder.max_length

    def image_context(self, images: jax.Array) -> jax.Array:
        """The decoder's image context: the un-pooled tokens of :meth:`image_features`."""
        return self.image.encode_tokens(images)

    def encode_context(self, images: jax.Array) -> jax.Array:
        """:meth:`image_context`."""
        return self.image_context(images)

    def init_cache(self, batch: int, max_length: int | None = None,
                   context: jax.Array | None = None) -> dict:
        """An empty cache for ``max_length`` positions (default :attr:`context_length`) with the
        cross-attention keys / values of ``context`` computed once (CoCa's ``index``,
        ``dec_k|dec_v``, ``cross_k|cross_v`` entries)."""
        lmax = self.context_length if max_length is None else int(max_length)
        if lmax > self.context_length:
            raise ValueError(f"max_length {lmax} exceeds model.decoder.max_length "
                             f"{self.context_length}.")
        if context is None or context.shape[0] != batch:
            raise ValueError(f"LocCa.init_cache needs the image context of the {batch} rows.")
        d = self.decoder.decoder
        kv_axes = ("layers", *layers.CACHE_AXES)
        zeros = constrain(jnp.zeros((d.depth, batch, lmax, d.num_heads, d.width // d.num_heads),
                                    self.decoder.dtype), *kv_axes)
        cross = d.context_kv(context)
        return {"index": jnp.zeros((), jnp.int32), "dec_k": zeros, "dec_v": zeros,
                "cross_k": constrain(cross["k"].astype(self.decoder.dtype), *kv_axes),
                "cross_v": constrain(cross["v"].astype(self.decoder.dtype), *kv_axes)}

    def step(self, tokens: jax.Array, cache: Mapping, valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict]:
        """Logits of ``tokens [B, T]`` at positions ``cache['index'] + arange(T)`` and the
        extended cache. Prompts are of one length (``valid`` must be None)."""
        if valid is not None:
            raise ValueError("LocCa decodes prompts of one length (absolute positions): pass no "
                             "prompt_valid.")
        x = self.decoder.embed(tokens, cache["index"])
        logits, new = self.decoder.decoder.step(x, cache)
        return logits, {**cache, **new, "index": cache["index"] + tokens.shape[1]}

    def full_logits(self, tokens: jax.Array, valid: jax.Array | None = None,
                    context: jax.Array | None = None) -> jax.Array:
        """The causal forward over ``tokens [B, T]`` (the decoding loop's uncached reference)."""
        if valid is not None:
            raise ValueError("LocCa decodes prompts of one length: pass no prompt_valid.")
        return self.decoder(context, tokens)

    def reorder_cache(self, cache: Mapping, indices: jax.Array) -> dict:
        """:func:`vlm_jax.models.coca.reorder_cache` (batch on axis 1 of the cache arrays)."""
        return reorder_cache(cache, indices)

    def locate(self, images: jax.Array, prompts: jax.Array) -> jax.Array:
        """Boxes ``[B, 4]`` (float32, ``(ymin, xmin, ymax, xmax)`` fractions) read greedily from
        the ARef prompts ``[B, P]`` (:meth:`TokenLayout.aref_prompts`): the four tokens after
        each prompt, restricted to box tokens (:class:`BoxReadout`). Call under ``jax.jit``."""
        from vlm_jax import decoding  # pylint: disable=import-outside-toplevel

        p = prompts.shape[1]
        tokens = decoding.generate(BoxReadout(self), images, prompt=prompts, jit=False,
                                   max_length=p + 4)
        return self.layout.tokens_to_boxes(tokens[:, p:p + 4])


class BoxReadout(nnx.Module):
    """A :class:`LocCa` seen by :mod:`vlm_jax.decoding` with only box tokens allowed: its
    logits outside the box range are -inf and nothing stops a row, so greedy decoding after an
    ARef prompt reads exactly four coordinates. The loops are decoding's own."""

    def __init__(self, model: LocCa):
        self.model = model

    def _boxes_only(self, logits: jax.Array) -> jax.Array:
        ids = jnp.arange(logits.shape[-1])
        lay = self.model.layout
        box = (ids >= lay.box_start) & (ids < lay.box_start + lay.num_bins)
        return jnp.where(box, logits, -jnp.inf)

    bos_id = property(lambda self: self.model.bos_id)
    pad_id = property(lambda self: self.model.pad_id)
    stop_ids = property(lambda self: ())
    context_length = property(lambda self: self.model.context_length)

    def encode_context(self, images):
        """The model's."""
        return self.model.encode_context(images)

    def init_cache(self, batch, max_length=None, context=None):
        """The model's."""
        return self.model.init_cache(batch, max_length, context)

    def step(self, tokens, cache, valid=None):
        """The model's, box tokens only."""
        logits, cache = self.model.step(tokens, cache, valid)
        return self._boxes_only(logits), cache

    def full_logits(self, tokens, valid=None, context=None):
        """The model's, box tokens only."""
        return self._boxes_only(self.model.full_logits(tokens, valid, context))

    def reorder_cache(self, cache, indices):
        """The model's."""
        return self.model.reorder_cache(cache, indices)


def decoder_flops(model_cfg: Any) -> float:
    """Forward matmul FLOPs of the decoder on one ``max_length`` sequence: per layer a causal
    self-attention block and a cross-attention block to the image tokens (attention counted in
    full, :func:`layers.attention_flops`), and the vocabulary projection."""
    cfg = to_plain_dict(model_cfg)
    dec, lay = decoder_settings(cfg), token_layout(cfg)
    img = cfg["image"]
    dims = resolve_dims(img.get("variant"), **{k: img.get(k) for k in
                                               ("width", "depth", "mlp_dim", "num_heads",
                                                "patch_size")})
    side = img.get("image_size", 224)
    side = side if isinstance(side, int) else side[0]
    n_ctx = (side // dims["patch_size"]) ** 2 + has_cls_token(img.get("pool_type", "tok"))
    w, length, iw = dec["width"], lay.max_length, dims["width"]
    self_block = layers.attention_flops(length, w, dec["mlp_dim"])
    cross = 2.0 * (2 * length * w * w + 2 * n_ctx * iw * w + 2 * length * n_ctx * w
                   + 2 * length * w * dec["mlp_dim"])
    return dec["depth"] * (self_block + cross) + 2.0 * length * w * lay.vocab_size


def locca_flops(model_cfg: Any, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs per example: the CLIP towers (:func:`clip_flops`) + the decoder."""
    return clip_flops(model_cfg, batch_size=batch_size) + decoder_flops(model_cfg)


__all__ = ["LocCa", "LocCaDecoder", "BoxReadout", "TokenLayout", "TASKS", "quantize_boxes",
           "dequantize_boxes", "decoder_inputs", "sequence_loss", "shift_right",
           "token_layout", "decoder_settings", "decoder_flops", "locca_flops"]
