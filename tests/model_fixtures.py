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


def clip_pair_batch(config, seed=0):
    """A random CLIP batch for ``config``: uint8 images and token rows ending at a random
    position in the config's eos id."""
    rng = np.random.default_rng(seed)
    b, s = config.batch_size, config.model.image.image_size
    L, V = config.model.text.context_length, config.model.text.vocab_size
    text = rng.integers(4, V, size=(b, L)).astype(np.int32)
    text[np.arange(b), rng.integers(3, L, size=b)] = config.model.text.eos_id
    return {"image": rng.integers(0, 256, size=(b, s, s, 3)).astype(np.uint8), "text": text}


def step_losses(config, mesh, batches):
    """``(losses, final state)`` of the real train step over ``batches`` on ``mesh``."""
    from vlm_jax import parallel, train  # pylint: disable=import-outside-toplevel

    s = train.setup(config, mesh)
    step = train.make_train_step(s, {k: v.shape for k, v in batches[0].items()})
    state = s.init_fn()
    losses = []
    for b in batches:
        state, m = step(state, parallel.make_global_batch(b, mesh))
        losses.append(float(m["train/loss"]))
    return np.array(losses), state
