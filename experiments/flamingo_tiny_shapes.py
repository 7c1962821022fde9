r"""A tiny Flamingo on the shapes documents: our CLIP's vision tower and our LM, both frozen.

    vlm-jax train --config experiments/clip_tiny.py --workdir runs/clip_tiny      # vision
    vlm-jax train --config experiments/lm_tiny_shapes.py --workdir runs/lm_tiny   # language
    vlm-jax train --config experiments/flamingo_tiny_shapes.py --workdir runs/flamingo_tiny

Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning" (2022), scaled down:
the ViT of experiments/clip_tiny.py (all 17 output tokens per image) and the LM of
experiments/lm_tiny_shapes.py stay frozen (``init_from``); a Perceiver resampler (depth 2, 8
latents; the paper: 6 and 64) and a gated cross-attention dense block before every LM layer
(the paper: every 4th to 7th) train, with the embeddings of the new ``<image>`` and
``<|endofchunk|>`` tokens (``optim.trainable``). Documents interleave up to 5 images with their
captions or question/answer pairs. Evaluation: 0/4/8-shot VQA accuracy and captioning CIDEr on
the shapes test split, examples from the train split. ``:test`` is a seconds-long smoke variant
with random frozen towers (no ``init_from``).
"""

from experiments import clip_tiny, lm_tiny_shapes


def get_config(arg=None):
    c = lm_tiny_shapes.get_config(arg)
    clip = clip_tiny.get_config(arg)
    c.name = "flamingo_tiny_shapes"
    c.total_steps = 600
    c.batch_size = 32
    c.log_every_steps = 20
    # One document per row (up to 5 images, at most ~90 tokens): no packing.
    c.data.update(seq_length=96, docs_per_row=1)
    lm = dict(c.model)
    lm.pop("name")
    c.model = dict(name="flamingo", vision=dict(clip.model.image), lm=lm,
                   resampler=dict(depth=2, num_latents=8, num_heads=4),
                   cross_attn=dict(num_heads=4, ff_mult=2), cross_attn_every=1,
                   dtype="float32", remat="none")
    # The frozen towers: the image tower of a CLIP run and a language-model run.
    c.init_from = dict(vision=dict(workdir="runs/clip_tiny", subtree="image"),
                       lm=dict(workdir="runs/lm_tiny", subtree=""))
    c.optim.update(lr=1e-3, b2=0.98, weight_decay=0.1, warmup_steps=50, end_lr_factor=0.0,
                   trainable=r"^(resampler|xattn|extra_embed|extra_head)(\.|$)")
    c.checkpoint.every_steps = 300
    # fewshot_pool: in-context examples from the start of fewshot_pool_split; shots: numbers of
    # in-context examples. dataset: 'shapes' or a prepared TFDS captions dataset, e.g.
    # 'tfds:coco_captions' with eval.data_dir (fewshot_captioning).
    c.eval = dict(batch_size=100, data_dir="")
    fewshot = dict(dataset="shapes", split="test", every_steps=0, max_examples=500,
                   options=dict(fewshot_pool=1000, fewshot_pool_split="train", shots=[0, 4, 8]))
    c.evals = dict(fewshot_vqa=dict(fewshot, type="fewshot_vqa"),
                   fewshot_captioning=dict(fewshot, type="fewshot_captioning"))
    if arg == "test":
        c.total_steps = 4
        c.batch_size = 8
        c.data.update(seq_length=48, docs_per_row=1)
        c.model.resampler.update(depth=1, num_latents=4, num_heads=2)
        c.model.cross_attn.update(num_heads=2)
        c.init_from = {}
        c.optim.warmup_steps = 1
        c.eval.batch_size = 8
        for entry in c.evals.values():
            entry.max_examples = 8
            entry.options.update(fewshot_pool=16, shots=[0, 2])
    return c
