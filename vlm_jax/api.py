"""The Python API: a trained or converted model as one object.

    import vlm_jax

    model = vlm_jax.load("runs/clip_tiny")            # a workdir, local or gs://
    image_emb = model.encode_image(["cat.jpg", "dog.png"])      # [2, D], L2-normalised
    text_emb = model.encode_text(["a photo of a cat", "a photo of a dog"])
    classifier = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
    probs = softmax(model.logit_scale * image_emb @ classifier.T)

:func:`load` takes what ``vlm-jax train`` or ``vlm-jax convert`` wrote: a workdir (its
``config.json`` and latest checkpoint), one checkpoint of it (``<workdir>/checkpoints/<step>``)
or its ``checkpoints`` directory. The model runs on the current devices: parameters placed by
the run's logical-axis rules on a mesh of those devices, each batch split over them (padded to
a multiple of the device count, the padding dropped from the result). It computes in float32
unless told otherwise (``dtype='bfloat16'``), whatever the run trained in: embeddings then match
the original model's (open_clip's, for a converted one) to float32 precision.

Everything model-specific is asked of the model's family (:mod:`vlm_jax.families`): how to
build it, the image size, the tokenizer (:meth:`~vlm_jax.families.Family.tokenizer`: the copy in
the workdir, or the file the config names; no dataset is built or opened), and whether it can
caption (the ``caption`` capability) or continue interleaved or text prompts (``interleaved``,
``lm``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from vlm_jax import parallel
from vlm_jax.config import ConfigError

ImageLike = Any  # a path (str / os.PathLike, local or gs://), a PIL image or a uint8 HWC array


class Preprocess:
    """The evaluation transform of a model: an image -> uint8 ``[size, size, 3]`` RGB.

    ``resize_mode`` ``'shortest'`` (default; OpenAI's and open_clip's): bicubic resize of the
    short side to ``size``, then a centre crop, torchvision's arithmetic; ``'squash'``: bicubic
    resize of both sides. The transform of ``vlm-jax eval``
    (:func:`input_pipeline.transforms.eval_resize`, ``config.eval.resize_mode``).
    Normalisation (mean / std) happens on the device, in the model.
    """

    def __init__(self, size: int, resize_mode: str = "shortest"):
        from input_pipeline.transforms import eval_resize  # pylint: disable=C0415

        self.size, self.resize_mode = int(size), resize_mode
        try:
            self._resize = eval_resize(self.size, resize_mode)
        except ValueError as e:  # DataError: the config's value
            raise ConfigError(str(e)) from e

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, resize_mode={self.resize_mode!r})"

    @staticmethod
    def to_rgb(image: ImageLike) -> np.ndarray:
        """A path / PIL image / array -> uint8 ``[H, W, 3]`` (grey and RGBA converted)."""
        if isinstance(image, (str, os.PathLike)):
            path = epath.Path(image)
            try:
                data = path.read_bytes()
            except FileNotFoundError as e:
                raise FileNotFoundError(f"Image {path} does not exist.") from e
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"))
        if isinstance(image, Image.Image):
            return np.asarray(image.convert("RGB"))
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"Image arrays must be uint8 pixels [H, W, 3] (got {array.dtype} "
                             f"{array.shape}); pass already normalised float batches of the "
                             "model's size to encode_image directly.")
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 4)):
            return np.asarray(Image.fromarray(array.squeeze(-1) if array.ndim == 3 and
                                              array.shape[-1] == 1 else array).convert("RGB"))
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"An image array must be [H, W, 3] uint8 (HWC), got {array.shape}.")
        return array

    def __call__(self, image: ImageLike) -> np.ndarray:
        return self._resize.map({"image": self.to_rgb(image)})["image"]


def resolve(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int | None]:
    """``(workdir, step)`` of a workdir, its ``checkpoints`` directory or one checkpoint
    ``<workdir>/checkpoints/<step>``.

    Raises ConfigError naming the path and what to pass instead (a weights file is converted
    first, with ``vlm-jax convert``).
    """
    p = epath.Path(os.fspath(path).rstrip("/"))
    if p.name.isdigit() and p.parent.name == "checkpoints":
        if step is not None and step != int(p.name):
            raise ConfigError(f"{p} is checkpoint {p.name}, not step={step}.")
        p, step = p.parent.parent, int(p.name)
    elif p.name == "checkpoints" and not (p / "config.json").exists():
        p = p.parent
    if (p / "config.json").exists():
        return p, step
    if not p.exists():
        raise ConfigError(f"vlm_jax.load: {p} does not exist.")
    if not p.is_dir() or (p / "open_clip_config.json").exists() or (p / "model.safetensors"
                                                                     ).exists():
        raise ConfigError(f"vlm_jax.load: {p} holds weights, not a vlm_jax workdir: convert it "
                          f"first (vlm-jax convert --input {p} --workdir DIR), then load DIR.")
    raise ConfigError(f"vlm_jax.load: {p} has no config.json: pass the workdir of a "
                      "`vlm-jax train` or `vlm-jax convert` run, or one of its "
                      "checkpoints/<step> directories.")


def _default_mesh(config) -> jax.sharding.Mesh:
    """The run's mesh when it fits the current devices (e.g. ``fsdp=-1``: parameters sharded
    over all of them), else data parallelism over all of them."""
    try:
        return parallel.create_mesh(config.mesh)
    except ValueError:
        return parallel.create_mesh({"data": -1})


def load(path: str | os.PathLike, *, step: int | None = None, dtype: str | None = "float32",
         mesh: jax.sharding.Mesh | None = None, batch_size: int | None = None) -> "Model":
    """A trained or converted model, ready for inference on the current devices.

    Args:
      path: a workdir of ``vlm-jax train`` / ``vlm-jax convert`` (local or ``gs://``), its
        ``checkpoints`` directory, or one checkpoint ``<workdir>/checkpoints/<step>``.
      step: the checkpoint to read (default: the latest, or the one ``path`` names).
      dtype: compute dtype (``model.dtype``): ``'float32'`` (default) whatever the run trained
        in; ``'bfloat16'`` for speed; None keeps the run's.
      mesh: where to place the parameters (default: the run's mesh if it fits the current
        devices, else data parallelism over all of them).
      batch_size: rows per device call (default ``config.eval.batch_size``), rounded to a
        multiple of the batch shards.

    Raises:
      ConfigError: ``path`` is not a workdir (the message says what to pass).
      CheckpointError: the workdir holds no checkpoint (or not ``step``).
    """
    from vlm_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    from vlm_jax import paths  # pylint: disable=import-outside-toplevel
    from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

    problem = paths.remote_problem(path)
    if problem:
        raise ConfigError(problem)
    workdir, step = resolve(path, step)
    config = config_lib.load_json_config(os.fspath(workdir / "config.json"))
    if dtype is not None and "dtype" in config.model:
        with config.unlocked():
            config.model.dtype = dtype
    family = get_family(config)
    mesh = mesh or _default_mesh(config)
    rules = tuple(tuple(r) for r in config.axis_rules)
    try:
        abstract = nnx.eval_shape(lambda: family.build_model(config.model, nnx.Rngs(0)))
    except ValueError as e:
        raise ConfigError(f"{workdir / 'config.json'}: config.model: {e}") from e
    graphdef, state = nnx.split(abstract)
    shardings = parallel.state_shardings(state, mesh, rules)
    abstract_params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state.to_pure_dict(),
        shardings)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every_steps=1, keep=10**6,
                                 async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ckpt_lib.CheckpointError(
                f"No checkpoint in {workdir / 'checkpoints'}; train first (vlm-jax train "
                f"--workdir {workdir}) or convert weights into it (vlm-jax convert).")
        if step not in ckpt.manager.all_steps():
            raise ckpt_lib.CheckpointError(
                f"{workdir / 'checkpoints'} has no step {step}; it has "
                f"{sorted(ckpt.manager.all_steps())}.")
        params = ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()
    return Model(config, workdir, step, graphdef, params, shardings, mesh, rules, batch_size)


class Model:
    """A model restored by :func:`load`: embeddings, zero-shot classifiers, captions and
    few-shot generation.

    Attributes: ``config`` (the run's, with the inference ``dtype``), ``family``, ``workdir``,
    ``step``, ``mesh``, ``params`` (the restored parameters, placed on ``mesh``),
    ``preprocess`` (:class:`Preprocess`, the evaluation transform) and ``tokenizer``
    (``encode(texts) -> int32 [N, L]``, ``decode``), loaded on first use.
    """

    def __init__(self, config, workdir, step, graphdef, params, param_shardings, mesh, rules,
                 batch_size: int | None = None):
        self.config, self.workdir, self.step = config, workdir, step
        from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

        self.family = get_family(config)
        self.graphdef, self.params, self.mesh, self.rules = graphdef, params, mesh, rules
        self._param_shardings = param_shardings
        self._shards = parallel.batch_shard_count(mesh)
        bs = int(batch_size or config.eval.batch_size)
        self.batch_size = max(self._shards, bs // self._shards * self._shards)
        size = self.family.image_size(config)
        self.preprocess = (Preprocess(size, config.eval.get("resize_mode", "shortest"))
                           if size else None)
        self._tokenizer = None
        self._fns: dict[Any, Callable] = {}

    def __repr__(self) -> str:
        return (f"Model({self.family.name}, step {self.step} of {self.workdir}, "
                f"{self.config.model.get('dtype', '?')}, mesh {dict(self.mesh.shape)})")

    # -- pieces ---------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The run's tokenizer (the family's :meth:`~vlm_jax.families.Family.tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = self.family.tokenizer(self.config, self.workdir)
        return self._tokenizer

    @property
    def logit_scale(self) -> float:
        """The learned inverse temperature (``exp`` of the parameter), for ``logits =
        logit_scale * image_emb @ text_emb.T`` as open_clip's ``model.logit_scale.exp()``."""
        return float(nnx.merge(self.graphdef, self.params).temperature())

    def _require(self, capability: str, what: str) -> None:
        if capability not in self.family.capabilities:
            raise ConfigError(f"{what} needs a model with the {capability!r} capability; "
                              f"{self.workdir} holds a {self.family.name!r} model "
                              f"({sorted(self.family.capabilities)}).")

    def _jit(self, key: Any, body: Callable) -> Callable:
        """``body(model, x, *args)`` jitted over the sharded parameters and a global batch, the
        result replicated; compiled once per key and input shape."""
        if key not in self._fns:
            graphdef, mesh, rules = self.graphdef, self.mesh, self.rules

            def fn(p, x, *args):
                with parallel.sharding_context(mesh, rules):
                    return body(nnx.merge(graphdef, p), x, *args)

            # The parameters and batches arrive placed (restored onto their shardings; a global
            # batch split over the batch axes): jit keeps those placements.
            self._fns[key] = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))
        return self._fns[key]

    def _run(self, fn: Callable, rows: np.ndarray | tuple[np.ndarray, ...], *args
             ) -> np.ndarray:
        """``fn(params, *rows, *args)`` over ``rows`` (an array, or a tuple of arrays with the
        same number of rows) in batches of at most ``batch_size``, each padded (last row
        repeated) to a multiple of the batch shards and split over them; padding dropped."""
        arrays = rows if isinstance(rows, tuple) else (rows,)
        out = []
        pc, pi = jax.process_count(), jax.process_index()
        for start in range(0, len(arrays[0]), self.batch_size):
            n = len(arrays[0][start:start + self.batch_size])
            size = -(-n // self._shards) * self._shards
            local = {}
            for i, a in enumerate(arrays):
                chunk = a[start:start + n]
                padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
                # Every process holds all rows and feeds its slice of the global batch.
                local[str(i)] = padded[pi * size // pc:(pi + 1) * size // pc]
            batch = parallel.make_global_batch(local, self.mesh)
            inputs = [batch[str(i)] for i in range(len(arrays))]
            out.append(np.asarray(fn(self.params, *inputs, *args))[:n])
        return np.concatenate(out)

    # -- embeddings -----------------------------------------------------------------------------

    def pixels(self, images: ImageLike | Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Images -> the batch the model reads: uint8 ``[N, S, S, 3]`` (:attr:`preprocess` of
        each). A single image is a batch of one; a uint8 ``[N, H, W, 3]`` array is N images; a
        float ``[N, S, S, 3]`` array is taken as already normalised pixels."""
        if self.preprocess is None:
            raise ConfigError(f"A {self.family.name!r} model reads no images.")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype != np.uint8:
                return images.astype(np.float32)
            images = list(images)
        elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("encode_image: no images.")
        return np.stack([self.preprocess(im) for im in images])

    def encode_image(self, images: ImageLike | Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings, float32 ``[N, D]``: paths (local or gs://), PIL
        images or uint8 HWC arrays, preprocessed with :attr:`preprocess` (see :meth:`pixels`).
        """
        self._require("embed", "encode_image")
        fn = self._jit("image", lambda m, x: m.encode_image(x))
        return self._run(fn, self.pixels(images)).astype(np.float32)

    def tokens(self, texts: str | Sequence[str] | np.ndarray) -> np.ndarray:
        """Texts -> int32 token ids ``[N, L]`` with the run's tokenizer; an integer array is
        taken as already tokenised."""
        if isinstance(texts, np.ndarray) and np.issubdtype(texts.dtype, np.integer):
            return texts.astype(np.int32).reshape(-1, texts.shape[-1])
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text: no texts.")
        return np.asarray(self.tokenizer.encode(texts), np.int32).reshape(len(texts), -1)

    def encode_text(self, texts: str | Sequence[str] | np.ndarray) -> np.ndarray:
        """L2-normalised text embeddings, float32 ``[N, D]``, of raw strings (tokenised with
        :attr:`tokenizer`) or of int token ids ``[N, L]``."""
        self._require("embed", "encode_text")
        fn = self._jit("text", lambda m, x: m.encode_text(x))
        return self._run(fn, self.tokens(texts)).astype(np.float32)

    def zero_shot_classifier(self, classnames: Sequence[str],
                             templates: Sequence[str | Callable[[str], str]] = (
                                 "a photo of a {}.",)) -> np.ndarray:
        """Class embeddings ``[C, D]`` for zero-shot classification, as CLIP: each template
        (``'a photo of a {}.'``, or a callable ``lambda c: ...`` as open_clip's) filled with each
        class name, encoded, and the normalised mean over templates, normalised. Classify with
        ``encode_image(images) @ classifier.T`` (:mod:`vlm_jax.evaluators.zeroshot`)."""
        classnames, templates = list(classnames), list(templates)
        if not classnames or not templates:
            raise ValueError("zero_shot_classifier needs class names and templates.")
        prompts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]
        emb = self.encode_text(prompts).reshape(len(classnames), len(templates), -1)
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
        mean = emb.mean(axis=1)
        return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, images: ImageLike | Sequence[ImageLike] | np.ndarray | None = None, *,
                 prompts: Sequence[Any] | None = None, method: str | None = None,
                 seed: int = 0, return_tokens: bool = False,
                 **options: Any) -> list[str] | np.ndarray:
        """Generated text: captions of ``images`` (a captioning model, CoCa), or continuations
        of ``prompts`` (a few-shot model, Flamingo; or a language model).

        * Captioning (the ``caption`` capability): ``generate(images)``, one caption each.
        * Interleaved (``interleaved``, Flamingo): each prompt a list of ``(image, text)``
          chunks, written as in training and few-shot evaluation (``<image>text<|endofchunk|>``
          each); the last text is left open and continued, e.g. ``[(im1, 'a red circle'),
          (im2, '')]`` captions ``im2`` after one example. Every prompt has the same number of
          images.
        * Language model (``lm``): each prompt a string.

        ``method``: ``'greedy'``, ``'beam'`` or ``'sample'`` (with ``seed``); ``options``: those
        of :func:`vlm_jax.decoding.generate` (``max_new_tokens``, ``beam_size``, ``top_k``,
        ``top_p``, ``temperature``...). Captioning defaults to the run's captioning entry's
        options (``config.evals``), else greedy; prompts to greedy with ``max_new_tokens=24``.
        Returns the detokenised texts (a prompt's continuation up to the end of its chunk), or
        the int32 tokens with ``return_tokens=True``. Each set of options compiles once.
        """
        from vlm_jax import decoding, evaluation  # pylint: disable=import-outside-toplevel

        caps = self.family.capabilities
        if prompts is None:
            self._require("caption", "generate(images)")
            if images is None:
                raise ValueError("generate: pass images (captioning) or prompts.")
            if method is None and not options:
                options = dict(evaluation.caption_options(self.config))
                method = options.pop("method", "greedy")
        elif images is not None:
            raise ValueError("generate: images go inside the prompts of an interleaved model "
                             "([(image, text), ...]), not beside them.")
        elif not caps & {"interleaved", "lm"}:
            raise ConfigError(f"generate(prompts=...) needs a few-shot or language model "
                              f"(the 'interleaved' or 'lm' capability); {self.workdir} holds a "
                              f"{self.family.name!r} model ({sorted(caps)}).")
        else:
            options.setdefault("max_new_tokens", 24)
        method = method or "greedy"
        key = ("generate", method, prompts is None, repr(sorted(options.items())))
        rng = jax.random.key(seed)
        if prompts is None:
            fn = self._jit(key, lambda m, x, r: decoding.generate(
                m, x, method=method, rng=r, jit=False, **options))
            tokens = self._run(fn, self.pixels(images), rng).astype(np.int32)
            if return_tokens:
                return tokens
            out = self.tokenizer.decode(tokens)
            return [out] if isinstance(out, str) else list(out)

        model = nnx.merge(self.graphdef, self.params)
        ids, media = self._prompt_tokens(model, prompts, int(options["max_new_tokens"]))
        from vlm_jax.evaluators.fewshot import _decode, _left_pad  # pylint: disable=C0415

        tokens, valid = _left_pad(ids, self.tokenizer.pad_id)
        width = tokens.shape[1]

        def body(m, *xs):
            *imgs, t, v, r = xs
            out = decoding.generate(m, imgs[0] if imgs else None, prompt=t, prompt_valid=v,
                                    method=method, rng=r, jit=False, **options)
            return out[:, width:]  # the continuation

        fn = self._jit(key + (width,), body)
        rows = ((media,) if media is not None else ()) + (tokens, valid)
        out = self._run(fn, rows, rng).astype(np.int32)
        if return_tokens:
            return out
        return [_decode(self.tokenizer, model, row) for row in out]

    def _prompt_tokens(self, model, prompts: Sequence[Any], max_new_tokens: int
                       ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Token rows (unpadded) of ``prompts`` and, for an interleaved model, their images
        ``[B, T, S, S, 3]``, written as :func:`input_pipeline.interleaved.document_ids` writes
        training documents (the few-shot evaluators' prompts)."""
        from input_pipeline import interleaved  # pylint: disable=import-outside-toplevel

        max_prompt = model.context_length - max_new_tokens
        multimodal = "interleaved" in self.family.capabilities
        image_id = getattr(model, "image_id", None) if multimodal else None
        eoc_id = getattr(model, "eoc_id", None) if multimodal else None
        rows, media = [], []
        for i, prompt in enumerate(prompts):
            if multimodal:
                chunks = list(prompt)
                if not chunks or not all(isinstance(c, (tuple, list)) and len(c) == 2
                                         for c in chunks):
                    raise ValueError(f"prompts[{i}]: an interleaved prompt is a list of "
                                     "(image, text) chunks.")
                texts = [str(t) for _, t in chunks]
                media.append(self.pixels([im for im, _ in chunks]))
            else:
                if not isinstance(prompt, str):
                    raise ValueError(f"prompts[{i}]: a language model's prompt is a string.")
                texts = [prompt]
            ids, _, kept = interleaved.document_ids(texts, self.tokenizer, max_prompt,
                                                    image_id=image_id, eoc_id=eoc_id,
                                                    close=False)
            if kept != len(texts):
                raise ValueError(f"prompts[{i}] does not fit in the model's context of "
                                 f"{model.context_length} tokens with max_new_tokens="
                                 f"{max_new_tokens}; shorten it.")
            rows.append(np.asarray(ids, np.int32))
        if not rows:
            raise ValueError("generate: no prompts.")
        if not multimodal:
            return rows, None
        if len({len(m) for m in media}) != 1:
            raise ValueError("generate: every interleaved prompt needs the same number of "
                             f"images (got {[len(m) for m in media]}).")
        return rows, np.stack(media)


__all__ = ["Model", "Preprocess", "load", "resolve"]
