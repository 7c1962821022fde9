r"""A tiny CLIP trained on the embedded "shapes" dataset: the quickstart, minutes on a laptop CPU.

    vlm-jax train --config experiments/clip_tiny.py --workdir runs/clip_tiny

The towers are small transformers (width 128, 4 layers, 4 heads, MLP 256; ViT patch 16 on 64 px
images, i.e. 16 patches) with CLIP's recipe: AdamW (b2 0.98, eps 1e-6, decay 0.2 off
gains/biases/temperature), warm-up + cosine, temperature initialised at 1/0.07 and clamped at
100. Arguments after ':' select a variant: ``clip_tiny.py:test`` is a seconds-long smoke config
used by the tests.

Three choices make it train in less than half the time of its first recipe (docs/benchmarks.md,
"The quickstart in half the time"), measured over two seeds each:

* The image embedding is the mean of the output tokens, without a class token
  (``pool_type='gap'``, big_vision's), not the class token: after 1,200 steps with the smaller
  towers below, zero-shot top-1 was 74.8 / 61.8 % (seeds 0 / 1) with the class token and 87.7 /
  94.4 % with averaged tokens; after 900 steps 84.5 / 91.2 %, where open_clip's
  ``pool_type='avg'`` (the patch tokens averaged, a class token still in the sequence) gave
  72.3 / 60.8 %. The first recipe gave 70.5 / 74.3 %. The errors averaging removes are shape
  confusions (star / cross / triangle, square / circle). Beyer et al. 2022 ("Better plain ViT
  baselines for ImageNet-1k") also found average pooling faster to train than a class token.
  Neither open_clip's nor transformers' towers pool this way, so ``vlm-jax export`` refuses
  this model; ``--config.model.image.pool_type=tok`` trains one it exports.
* MLPs of 2 x width (256) instead of 4 x, and a 16-token text context instead of 24: captions
  are at most 22 tokens with their bos and eos, 16 % are longer than 16 and lose their ends
  (the main object, which the label names, is described first). The step costs about half.
* 700 steps instead of 1,200 (81.0 / 89.3 % with the choices above), evaluations and
  checkpoints at steps 350 and 700 instead of every 400 and every 200.

The derived experiments with figures of their own (``siglip_tiny``, ``coca_tiny_shapes``, and
through them ``locca_tiny_shapes`` and ``siglip2_tiny_shapes``) keep the first recipe,
with which those figures were measured (:func:`first_recipe`).
"""

import math

from vlm_jax import configs


def get_config(arg=None):
    c = configs.base_config()  # The defaults, and what every key means: vlm_jax/configs.py.
    c.name = "clip_tiny"
    c.total_steps = 700
    c.batch_size = 128
    c.log_every_steps = 20
    # data: the base's, the embedded shapes dataset at 64 px (built on first use).

    c.model = dict(
        name="clip",
        embed_dim=128,
        image=dict(image_size=64, patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=256,
                   pool_type="gap", pre_norm=True, patch_bias=False, act="gelu"),
        text=dict(width=128, depth=4, num_heads=4, mlp_dim=256, vocab_size=512,
                  context_length=16, eos_id=3, act="gelu"),
        logit_scale_init=math.log(1 / 0.07),
        logit_scale_max=math.log(100.0),
        logit_bias_init=None,  # a float adds SigLIP's learned bias (experiments/siglip_tiny.py)
        dtype="float32",
        remat="none",
        scan_layers=False,
    )
    # loss: the base's softmax contrastive loss, all-gathered. optim: CLIP's recipe (the base's
    # AdamW b2 0.98, eps 1e-6, weight decay 0.2, cosine) at a small model's learning rate,
    # warm-up and clipping.
    c.optim.update(lr=1e-3, warmup_steps=100, grad_clip_norm=1.0)
    c.checkpoint.every_steps = 350
    # Shared by every evaluation: the feature-extraction batch and the directory of 'tfds:<name>'
    # datasets. Each entry of c.evals is one evaluation, results keyed <entry>/<metric>
    # (vlm_jax/evaluation.py): dataset 'shapes' or 'tfds:<name>' (imagenet2012, cifar10,
    # coco_captions...); every_steps N (and at the end), 0 (at the end), -1 (on request:
    # vlm-jax eval --evaluators linear_probe). linear_probe fits on probe_examples images of
    # probe_split, picks its regularisation on probe_val_split, and adds few-shot ridge probes.
    c.eval = dict(batch_size=256, data_dir="")
    c.evals = dict(
        zeroshot=dict(type="zeroshot", dataset="shapes", split="test", every_steps=350,
                      max_examples=0, options={}),
        retrieval=dict(type="retrieval", dataset="shapes", split="test", every_steps=350,
                       max_examples=0, options={}),
        linear_probe=dict(type="linear_probe", dataset="shapes", split="test", every_steps=-1,
                          max_examples=0,
                          options=dict(probe_examples=5000, probe_split="train",
                                       probe_val_split="validation", shots=[1, 5, 10, 25])))

    if arg == "test":  # Seconds on a CPU: the tests' smoke run.
        c.total_steps = 6
        c.batch_size = 16
        c.log_every_steps = 2
        c.data.config_name = "32px"
        # The first recipe's class token and 24-token context: the tests' references.
        c.model.image.update(image_size=32, width=32, depth=1, num_heads=2, mlp_dim=64,
                             pool_type="tok")
        c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64, context_length=24)
        c.model.embed_dim = 32
        c.optim.warmup_steps = 2
        c.checkpoint.every_steps = 3
        c.eval.batch_size = 64
        for entry in c.evals.values():
            entry.update(every_steps=min(entry.every_steps, 0), max_examples=128)
        c.evals.linear_probe.options.update(probe_examples=256, shots=[1, 2])
    elif arg is not None:
        raise ValueError(f"clip_tiny.py: unknown variant {arg!r} (use 'test' or nothing).")
    return c


def first_recipe(c) -> None:
    """Puts the quickstart's first recipe back into a config built from :func:`get_config` (not
    ``:test``, whose sizes are its own): class-token pooling, MLPs of 4 x width, a 24-token
    context, 1,200 steps, evaluations every 400 and checkpoints every 200 steps. The experiments
    whose documented figures were measured with it call it."""
    c.total_steps = 1200
    c.checkpoint.every_steps = 200
    for entry in c.evals.values():
        if entry.every_steps > 0:
            entry.every_steps = 400
    c.model.image.update(pool_type="tok", mlp_dim=4 * c.model.image.width)
    c.model.text.update(mlp_dim=4 * c.model.text.width, context_length=24)
