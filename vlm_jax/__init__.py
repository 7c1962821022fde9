"""vlm_jax: pretraining and evaluation of vision-language models in JAX / Flax NNX."""
from flax import nnx as _nnx

# Parameters carry *logical* axis names; they are mapped to mesh axes by vlm_jax.parallel when the
# train state is created under jit with explicit out_shardings, never eagerly at construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"


def __getattr__(name):
    """``vlm_jax.load`` / ``vlm_jax.Model`` (:mod:`vlm_jax.api`), imported on first use so that
    ``import vlm_jax`` stays light."""
    if name in ("load", "Model"):
        from vlm_jax import api  # pylint: disable=import-outside-toplevel

        return getattr(api, name)
    raise AttributeError(f"module 'vlm_jax' has no attribute {name!r}")
