r"""LiT-B16B: big_vision's LiT recipe (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image
text Tuning", CVPR 2022) on a ViT-B/16 image tower and a Base text tower.

    vlm-jax convert --input ViT-B-16.pt --act quick_gelu --workdir gs://$BUCKET/runs/openai_b16
    vlm-jax compile --config experiments/lit_b16b.py --topology v4:2x2x1
    vlm-jax train   --config experiments/lit_b16b.py --workdir gs://$BUCKET/runs/lit_b16b

The recipe is big_vision's ``configs/proj/image_text/lit_coco.py`` (the config of the LiT
README's B16B rows, as it stood before its 2023 rename to ``siglip_lit_coco.py``): batch
4,096, 5,000 steps on ``coco_captions``; the image tower loaded and locked (its ``img/.*``
parameters get schedule ``None``: no update, no optimizer state), a new projection-free text
side; Adam (optax ``scale_by_adam``: b1 0.9, b2 0.999, eps 1e-8), learning rate 1e-3 with
``max(3 %, 100)`` warm-up steps and a cosine decay, decoupled weight decay 0.01 on kernels,
global-norm clipping at 1.0, temperature initialised at 10, 224 px, 16 text tokens.

Published (big_vision ``README_lit.md``, ImageNet zero-shot / COCO I->T / T->I recall@1):
LiT-B16B 72.1 / 49.4 / 31.1 and LiT-B16B_2 73.9 / 51.5 / 31.8 (CC12M + YFCC100M, 30k and 60k
steps); coco_B16B, this config on ``coco_captions`` alone, 20.7 / 47.2 / 32.1.

What differs here, and why:

* The locked tower. big_vision loads an ImageNet-21k AugReg ViT-B/16 (``.npz``), which
  ``vlm-jax convert`` does not read; this config locks OpenAI CLIP's ViT-B/16 image tower and
  its projection (``vlm-jax convert``, ``init_from`` below): same shapes of the ViT, another
  pre-training, so the published numbers are the recipe's, not a target for this tower.
* The text tower is CLIP's text transformer at BERT-Base size (width 768, 12 layers, 12 heads)
  with OpenAI's BPE, not BERT (no BERT port in vlm_jax); it is trained from scratch.
* big_vision's weight decay is added unscaled by the learning rate (``sched x (lr x adam +
  wd x p)``), optax.adamw's is scaled by it (``lr_t x (adam + wd x p)``): ``weight_decay =
  0.01 / 1e-3 = 10`` gives the same decay per step.
* The topology. big_vision's README does not say what the B16B runs used; ``--topology
  v4:2x2x1`` (4 v4 chips, SigLiT's budget in experiments/lit_g14_sigmoid.py): the step fits
  in one pass at 9.2 of 32 GiB per chip, 323 ms at 50 % MFU (docs/benchmarks.md).
"""

import math

from vlm_jax import configs
from vlm_jax.models.clip import clip_config

PUBLISHED = {"imagenet_zero_shot_top1": {"LiT-B16B": 0.721, "LiT-B16B_2": 0.739,
                                         "coco_B16B": 0.207},
             "source": "big_vision/configs/proj/image_text/README_lit.md"}
TOWER = "gs://YOUR_BUCKET/runs/openai_b16"  # `vlm-jax convert` of OpenAI's ViT-B-16


def get_config(arg=None):
    if arg:
        raise ValueError(f"lit_b16b.py takes no argument (got {arg!r}).")
    c = configs.base_config()
    c.name = "lit_b16b"
    c.batch_size = 4096
    c.total_steps = 5000
    c.log_every_steps = 50

    c.data.update(name="tfds", train_files="coco_captions@train", image_key="image",
                  caption_key="captions/text", tokenizer="clip_bpe", worker_count=16)

    m = clip_config("ViT-B/16")  # OpenAI's tower: the one init_from loads
    m.update(name="lit", locked="image", embed_dim=512, dtype="bfloat16", scan_layers=True,
             remat="full", logit_scale_init=math.log(10.0), logit_scale_max=math.log(100.0),
             logit_bias_init=None)
    m["text"].update(width=768, depth=12, num_heads=12, mlp_dim=3072, context_length=16)
    c.model = m
    c.init_from = {part: dict(workdir=TOWER, subtree=part)
                   for part in ("image", "image_projection")}

    c.optim.update(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01 / 1e-3,
                   warmup_steps=max(int(0.03 * c.total_steps), 100), schedule="cosine",
                   grad_clip_norm=1.0)
    c.mesh.update(data=1, fsdp=-1)
    c.checkpoint.update(every_steps=1000)
    c.eval = dict(batch_size=1024, data_dir="")
    c.evals = dict(
        imagenet=dict(type="zeroshot", dataset="tfds:imagenet2012", split="validation",
                      every_steps=-1, max_examples=0, options={}),
        coco=dict(type="retrieval", dataset="tfds:coco_captions", split="val",
                  every_steps=-1, max_examples=0, options={}))
    c.published = PUBLISHED
    return c
