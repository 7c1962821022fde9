"""vlm_jax: pretraining and evaluation of vision-language models in JAX / Flax NNX."""
from flax import nnx as _nnx

# Parameters carry *logical* axis names; they are mapped to mesh axes by vlm_jax.parallel when the
# train state is created under jit with explicit out_shardings, never eagerly at construction.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
