"""Sharded feature extraction shared by the evaluators."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import parallel


class FeatureExtractor:
    """Runs a model's ``encode_image`` / ``encode_text`` data-parallel over the whole mesh.

    Every process holds the full (small) evaluation arrays; each batch is split so that process
    ``i`` feeds its rows, and the features come back replicated to every process as numpy.
    """

    def __init__(self, graphdef: nnx.GraphDef, params, param_shardings, mesh, rules,
                 batch_size: int):
        n = parallel.batch_shard_count(mesh)
        self.batch_size = max(n, (batch_size // n) * n)
        self.mesh = mesh
        replicated = NamedSharding(mesh, P())

        def make(method: str) -> Callable:
            def fn(p, x):
                with parallel.sharding_context(mesh, rules):
                    return getattr(nnx.merge(graphdef, p), method)(x)

            return jax.jit(fn, in_shardings=(param_shardings, None), out_shardings=replicated)

        self._fns = {"image": make("encode_image"), "text": make("encode_text")}
        self.params = params

    def _run(self, kind: str, array: np.ndarray) -> np.ndarray:
        fn, bs = self._fns[kind], self.batch_size
        pc, pi = jax.process_count(), jax.process_index()
        out = []
        for start in range(0, len(array), bs):
            chunk = array[start:start + bs]
            n = len(chunk)
            if n < bs:  # Pad the last batch; padded rows are dropped below.
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
            local = chunk[pi * bs // pc:(pi + 1) * bs // pc]
            batch = parallel.make_global_batch({"x": local}, self.mesh)["x"]
            out.append(np.asarray(fn(self.params, batch))[:n])
        return np.concatenate(out).astype(np.float32)

    def images(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings [N, D]."""
        return self._run("image", images)

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """L2-normalised text embeddings [N, D]."""
        return self._run("text", tokens)


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalises ``x`` along ``axis`` (float64 accumulation)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
