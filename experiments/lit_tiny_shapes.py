r"""LiT / SigLiT on the embedded "shapes" dataset: a text tower tuned against the quickstart's
locked image tower.

    vlm-jax train --config experiments/clip_tiny.py --workdir runs/clip_tiny  # the image tower
    vlm-jax train --config experiments/lit_tiny_shapes.py --workdir runs/lit_tiny
    vlm-jax train --config experiments/lit_tiny_shapes.py:sigmoid --workdir runs/siglit_tiny

Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning" (CVPR 2022): the image
tower (and its projection) of a trained model is loaded and locked (``model.locked='image'``:
no gradient, no optimizer state, see vlm_jax/families/lit.py); a new text tower, of
``clip_tiny``'s size, learns to map the captions onto its embeddings with CLIP's softmax loss
(``:sigmoid``: SigLIP's sigmoid loss, temperature 10 and bias -10 at the start, SigLiT).
``init_from`` reads ``runs/clip_tiny`` (``--config.init_from...workdir=...`` for another run, or
a ``vlm-jax convert``-ed OpenAI / open_clip model whose image tower has this shape).

The locked tower sees no augmentation, so its embeddings can be computed once and the steps
run the text tower only:

    vlm-jax data embed --config experiments/lit_tiny_shapes.py --output runs/lit_tiny_emb
    vlm-jax train --config experiments/lit_tiny_shapes.py --workdir runs/lit_tiny_cached \
        --config.data.name=image_embeddings --config.data.train_files=runs/lit_tiny_emb

(the same pairs at every step, the same losses within float tolerance, tests/test_lit.py).

Half the quickstart's steps (600 of 1,200, warm-up 50): the image side is already trained. The
optimizer is clip_tiny's (AdamW lr 1e-3, b2 0.98, weight decay 0.2 on the text tower's weights,
cosine, clipping at 1). Results on this CPU are in README.md ("LiT and SigLiT").

Arguments after ':' (comma-separated): ``sigmoid`` (SigLiT), ``test`` (a seconds-long smoke run
on clip_tiny.py:test's sizes, with a random locked tower unless the caller sets ``init_from``).
"""

import math

from experiments import clip_tiny

QUICKSTART = "runs/clip_tiny"  # the workdir of experiments/clip_tiny.py (the README's command)


def get_config(arg=None):
    args = set(filter(None, (arg or "").split(",")))
    unknown = args - {"sigmoid", "test"}
    if unknown:
        raise ValueError(f"lit_tiny_shapes.py: unknown variant(s) {sorted(unknown)} (use "
                         "'sigmoid', 'test' or both, comma-separated).")
    c = clip_tiny.get_config("test" if "test" in args else None)
    c.name = "siglit_tiny_shapes" if "sigmoid" in args else "lit_tiny_shapes"
    c.model.name = "lit"
    c.model.locked = "image"  # image + image_projection: loaded, then locked
    c.init_from = {part: dict(workdir=QUICKSTART, subtree=part)
                   for part in ("image", "image_projection")}
    if "sigmoid" in args:  # SigLiT: SigLIP's loss and its initial temperature and bias.
        c.model.logit_scale_init = math.log(10.0)
        c.model.logit_bias_init = -10.0
        c.loss.name = "sigmoid"
        c.loss.variant = "ring"
    if "test" in args:
        c.init_from = {}  # The smoke run's locked tower is random unless the caller sets one.
    else:
        c.total_steps = 600
        c.optim.warmup_steps = 50
        for entry in c.evals.values():
            if entry.every_steps > 0:
                entry.every_steps = 200
    return c
