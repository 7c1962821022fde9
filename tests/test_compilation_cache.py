"""XLA's CPU client, serialising a compiled train step and loading it again (what JAX's
persistent compilation cache does on a hit), against the executable it compiled.

Known failure (jaxlib 0.10.2): the micro-batched SigLIP step with the ``ring_recompute`` loss on
the data=2 x fsdp=2 x tensor=2 mesh, loaded from its serialised form, returns gradients that
differ from the compiled executable's by 10 to 1e25, varying from load to load. This is why
tests/conftest.py keeps the persistent cache out of the in-process tests. The test is marked
``xfail`` (not strict: whether a given compile is affected varies) and ``slow``; an XPASS in
``-m slow`` runs says a jaxlib upgrade fixed it.
"""
import jax
import numpy as np
import pytest
from jax.experimental import serialize_executable

from vlm_jax import config as config_lib
from vlm_jax import parallel, train
from tests.model_fixtures import clip_pair_batch

pytestmark = pytest.mark.slow


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])


@pytest.mark.xfail(strict=False, reason="XLA CPU executable serialisation (jaxlib 0.10.2): "
                   "wrong gradients after a round trip; see the module docstring")
def test_a_serialised_step_computes_what_the_compiled_one_does(repo_root):
    config = config_lib.load_config(
        f"{repo_root}/experiments/clip_tiny.py:test",
        ["batch_size=32", "loss.name=sigmoid", "loss.variant=ring_recompute",
         "model.logit_bias_init=-10.0", "model.logit_scale_init=2.302585",
         "optim.grad_accum_steps=4"])
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s = train.setup(config, mesh)
    params = s.init_fn()["params"]
    batch = parallel.make_global_batch(clip_pair_batch(config), mesh)
    compiled = jax.jit(train.make_loss_and_grads(s)).lower(params, batch).compile()
    ref = _flat(compiled(params, batch)[2])
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    loaded = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    np.testing.assert_allclose(_flat(loaded(params, batch)[2]), ref, atol=1e-6, rtol=0)
