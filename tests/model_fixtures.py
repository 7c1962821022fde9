"""Models with known random parameters, without running an initializer."""
import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomize(model, seed=0, scale=0.1):
    """Replaces every parameter of ``model`` (abstract or built) by N(0, scale) numpy noise
    (norm scales: 1 + noise); no compile."""
    rs = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        noise = rs.randn(*shape) * scale + (1.0 if path[-1] == "scale" else 0.0)
        var.set_value(jnp.asarray(noise, jnp.float32))
    return model
