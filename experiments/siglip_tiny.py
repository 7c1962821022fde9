r"""SigLIP on the embedded "shapes" dataset: ``clip_tiny`` with the pairwise sigmoid loss.

    vlm-jax train --config experiments/siglip_tiny.py --workdir runs/siglip_tiny

Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023): every image-text pair of the
batch is an independent binary classification, ``-log sigmoid(z * (t * x.y + b))`` with
``z = +1`` for the matching pair and ``-1`` otherwise; the temperature ``t`` and bias ``b`` are
learned, initialised at ``log t = log 10`` and ``b = -10`` (the paper's Section 3.3, and
big_vision's ``siglip`` configs). The loss is computed in big_vision's ring form (text blocks
passed around the devices with ``ppermute``; ``config.loss.variant='gather'`` all-gathers
instead). Everything else is ``clip_tiny``'s first recipe, with which this config's figures
were measured (``clip_tiny.first_recipe``: class-token pooling, MLPs of 4 x width, a 24-token
context, 1,200 steps); the ``:test`` variant is ``clip_tiny``'s.
"""

import math

from experiments import clip_tiny


def get_config(arg=None):
    c = clip_tiny.get_config(arg)
    if arg is None:  # the recipe this config's figures were measured with
        clip_tiny.first_recipe(c)
    c.name = "siglip_tiny"
    c.model.logit_scale_init = math.log(10.0)
    c.model.logit_bias_init = -10.0
    c.loss.name = "sigmoid"
    c.loss.variant = "ring"
    return c
