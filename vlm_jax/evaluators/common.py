"""Sharded feature extraction shared by the evaluators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import parallel
from vlm_jax.models import locca


class FeatureExtractor:
    """Runs a model's ``encode_image`` / ``encode_text`` data-parallel over the whole mesh.

    Every process holds the full (small) evaluation arrays; each batch is split so that process
    ``i`` feeds its rows, and the features come back replicated to every process as numpy.
    Every batch has ``batch_size`` rows (the last one padded), so each jitted function compiles
    once per input shape; keep one extractor per run and set ``params`` before each evaluation
    (:class:`vlm_jax.evaluation.Evaluation` does) to compile nothing after the first.
    """

    def __init__(self, graphdef: nnx.GraphDef, params, param_shardings, mesh, rules,
                 batch_size: int, tokenizer: Any = None, caption_options: dict | None = None):
        n = parallel.batch_shard_count(mesh)
        self.batch_size = max(n, (batch_size // n) * n)
        self.mesh = mesh
        self.graphdef, self.rules, self.param_shardings = graphdef, rules, param_shardings
        self.tokenizer = tokenizer
        self.caption_options = dict(caption_options or {})
        replicated = NamedSharding(mesh, P())

        def make(method: str) -> Callable:
            def fn(p, x):
                with parallel.sharding_context(mesh, rules):
                    return getattr(nnx.merge(graphdef, p), method)(x)

            return jax.jit(fn, in_shardings=(param_shardings, None), out_shardings=replicated)

        self._fns = {"image": make("encode_image"), "text": make("encode_text")}
        self._cache: dict = {}
        # The parameters evaluated; a run keeping this extractor sets them before each
        # evaluation (same shardings: nothing is recompiled).
        self.params = params

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per extractor under ``key``: jitted functions that evaluators make
        (few-shot generation, the LM loss) live as long as the extractor, so that a run that
        keeps one extractor compiles them once, not at every evaluation."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _caption_fn(self, options: dict) -> Callable:
        def build():
            from vlm_jax import decoding  # pylint: disable=import-outside-toplevel

            opts = dict(options)
            method = opts.pop("method", "greedy")
            graphdef, mesh, rules = self.graphdef, self.mesh, self.rules

            def fn(p, x):
                with parallel.sharding_context(mesh, rules):
                    return decoding.generate(graphdef, x, params=p, method=method, jit=False,
                                             **opts)

            return jax.jit(fn, in_shardings=(self.param_shardings, None),
                           out_shardings=NamedSharding(mesh, P()))

        return self.cached(("caption", repr(sorted(options.items()))), build)

    def captions(self, images: np.ndarray, **options) -> list[str]:
        """Generated captions, detokenised; for captioning models. ``options``: ``method``
        greedy / beam / sample and the options of :func:`vlm_jax.decoding.generate` (default
        ``caption_options``); each set of options is compiled once per extractor."""
        if not hasattr(nnx.merge(self.graphdef, self.params), "image_context"):
            raise ValueError("This model has no captioning decoder: captions need a model of a "
                             "family with the 'caption' capability (CoCa, LocCa).")
        if self.tokenizer is None:
            raise ValueError("FeatureExtractor.captions needs the tokenizer to detokenise.")
        fn = self._caption_fn(options or self.caption_options)
        tokens = self._run(fn, images, cast=False).astype(np.int32)
        out = self.tokenizer.decode(tokens)
        return [out] if isinstance(out, str) else list(out)

    def locate(self, images: np.ndarray, expressions) -> np.ndarray:
        """Boxes ``[N, 4]`` (ymin, xmin, ymax, xmax fractions) of the objects ``expressions``
        name in ``images``, for a model of the ``locate`` capability (LocCa: ARef prompts
        decoded greedily, :meth:`vlm_jax.models.locca.LocCa.locate`); compiled once per
        extractor. The :class:`vlm_jax.evaluators.localisation.BoxPredictor` of ``refexp``."""
        model = nnx.merge(self.graphdef, self.params)
        if not hasattr(model, "locate"):
            raise ValueError("This model predicts no boxes: refexp needs a model of a family "
                             "with the 'locate' capability (LocCa).")
        if self.tokenizer is None:
            raise ValueError("FeatureExtractor.locate needs the tokenizer for the expressions.")
        prompts = model.layout.aref_prompts(locca.text_pieces(self.tokenizer, list(expressions)))

        def build():
            graphdef, mesh, rules = self.graphdef, self.mesh, self.rules

            def fn(p, x, prompt):
                with parallel.sharding_context(mesh, rules):
                    return nnx.merge(graphdef, p).locate(x, prompt)

            return jax.jit(fn, in_shardings=(self.param_shardings, None, None),
                           out_shardings=NamedSharding(mesh, P()))

        fn = self.cached("locate", build)
        bs, out = self.batch_size, []
        for start in range(0, len(images), bs):
            rows = {"x": images[start:start + bs], "prompt": prompts[start:start + bs]}
            batch = self.global_batch(rows, bs)
            out.append(np.asarray(fn(self.params, batch["x"], batch["prompt"]))[:len(rows["x"])])
        return np.concatenate(out).astype(np.float32)

    def global_batch(self, arrays: dict[str, np.ndarray], size: int) -> dict[str, jax.Array]:
        """Rows every process holds -> global arrays of ``size`` rows sharded over the mesh's
        batch axes: the last row is repeated up to ``size`` (drop those outputs), and each
        process contributes its slice of the rows."""
        pc, pi = jax.process_count(), jax.process_index()
        local = {}
        for key, a in arrays.items():
            if len(a) < size:
                a = np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)])
            local[key] = a[pi * size // pc:(pi + 1) * size // pc]
        return parallel.make_global_batch(local, self.mesh)

    def _run(self, fn: Callable, array: np.ndarray, cast: bool = True) -> np.ndarray:
        bs = self.batch_size
        out = []
        for start in range(0, len(array), bs):
            chunk = array[start:start + bs]
            batch = self.global_batch({"x": chunk}, bs)["x"]
            out.append(np.asarray(fn(self.params, batch))[:len(chunk)])
        out = np.concatenate(out)
        return out.astype(np.float32) if cast else out

    def images(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings [N, D]."""
        return self._run(self._fns["image"], images)

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """L2-normalised text embeddings [N, D]."""
        return self._run(self._fns["text"], tokens)


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalises ``x`` along ``axis`` (float64 accumulation)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
