r"""SigLIP 2 ViT-B/16 pre-training (Tschannen et al., 2025, "SigLIP 2: Multilingual
Vision-Language Encoders with Improved Semantic Understanding, Localization, and Dense
Features", arXiv 2502.14786), without its LocCa captioning decoder (not in this family).

    vlm-jax compile --config experiments/siglip2_b16.py --topology v5e:16x16
    vlm-jax train   --config experiments/siglip2_b16.py --workdir gs://$BUCKET/runs/siglip2_b16

The paper's figures (Sec. 2.1-2.3), and what we chose where it gives none:

* architecture: SigLIP's (ViT-B/16 image tower with a MAP head, a B-sized text tower, the
  pooled image feature as the embedding, a biased text head; learned temperature and bias
  initialised at log 10 and -10, SigLIP Sec. 3.3). Patch 16, image resolution 256 (sequence
  length 256) and text length 64 for every size; the multilingual Gemma tokenizer (256k
  vocabulary): ``data.tokenizer`` must point at its sentencepiece ``.model``.
* optimiser: Adam, learning rate 1e-3, decoupled weight decay 1e-4, gradient clipping to norm
  1; batch 32k (32,768), a cosine schedule with 20k warm-up steps, 40B examples in total
  (1,220,703 steps). big_vision's decoupled decay is ``p -= wd x schedule(t) x p`` with the
  schedule's peak at 1; optax.adamw multiplies ``weight_decay`` by the learning rate, so
  ``weight_decay = 1e-4 / 1e-3 = 0.1`` gives the same decay. Adam's b2 is not given: 0.95,
  the value of big_vision's SigLIP configs; eps the optax default 1e-8.
* self-distillation and masked prediction from 80 % of training (the last 20 %), weights 1 and
  0.25 multiplied by the B size factor 0.25 (0.25 / 0.5 / 1.0 / 0.5 for B / L / So400m / g),
  one global and 8 local views, 50 % of the patches masked: Sec. 2.3 as we read it (the text
  of the paper was not at hand to re-check the weights and factors when this file was written).
  SILC (arXiv 2310.13355): crop scales 0.4-1.0 / 0.05-0.4, a fixed EMA momentum (its value not
  found: 0.996, DINO's base). Heads: DINO's (hidden 2048, bottleneck 256, 65,536 prototypes,
  temperatures 0.04 / 0.1); the local views at 112 px (DINO's 96/224 of the side, rounded to
  the patch).
* not reproduced: the LocCa decoder and its captioning / referring losses, the active data
  curation of the small models, NaFlex, and WebLI (point ``data.train_files`` at image-text
  shards). Published zero-shot ImageNet top-1 of SigLIP 2 B/16 at 256 px: 79.1 % (Table 1, as
  we read it).

Scale settings as experiments/clip_openai.py: bfloat16 compute, float32 parameters, FSDP over
every chip, scanned and rematerialised layers, the ring sigmoid loss. ``vlm-jax compile
--topology v5p:4x8x8 --grad_accum_steps 1`` (256 chips, 128 images each, both terms compiled):
421.4M parameters (with the two 65,536-prototype heads), peak 41.5 GiB of the 95 GiB per chip
(43.7 %). The analytic model FLOPs (MFU) count the SigLIP towers only, not the teacher, the
views or the heads of the last 20 % of training. Micro-batching is refused with the teacher.
"""

import math

from vlm_jax import configs


def get_config(arg=None):
    if arg is not None:
        raise ValueError(f"siglip2_b16.py takes no argument, got {arg!r}.")
    c = configs.base_config()  # The defaults, and what every key means: vlm_jax/configs.py.
    c.name = "siglip2_b16"
    c.batch_size = 32768
    c.total_steps = 40_000_000_000 // c.batch_size  # 1,220,703
    c.data.update(name="webdataset", worker_count=16,
                  train_files="gs://YOUR_BUCKET/webli/{00000..99999}.tar",
                  tokenizer="gs://YOUR_BUCKET/gemma/tokenizer.model")

    width = 768
    tower = dict(width=width, depth=12, num_heads=12, mlp_dim=3072, act="gelu_tanh",
                 ln_eps=1e-6)
    c.model = dict(
        name="clip",
        embed_dim=width,
        image=dict(**tower, image_size=256, patch_size=16, pool_type="map", pre_norm=False,
                   patch_bias=True, pixel_mean=[0.5, 0.5, 0.5], pixel_std=[0.5, 0.5, 0.5]),
        text=dict(**tower, vocab_size=256_000, context_length=64, pool_type="last",
                  causal=False),
        project_image=False,
        text_projection_bias=True,
        logit_scale_init=math.log(10.0),
        logit_scale_max=math.log(100.0),
        logit_bias_init=-10.0,
        ssl_prototypes=65536,
        ssl_hidden_dim=2048,
        ssl_bottleneck_dim=256,
        dtype="bfloat16",
        remat="full",
        scan_layers=True,
    )
    size_factor = 0.25  # B
    c.loss.update(name="sigmoid", variant="ring",
                  self_distill_weight=1.0 * size_factor, masked_pred_weight=0.25 * size_factor,
                  ssl_start_fraction=0.8, ema_momentum=0.996, local_views=8, local_size=112,
                  global_crop_scale=[0.4, 1.0], local_crop_scale=[0.05, 0.4], mask_ratio=0.5,
                  student_temp=0.1, teacher_temp=0.04)
    c.optim.update(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4 / 1e-3,
                   warmup_steps=20_000, schedule="cosine", grad_clip_norm=1.0)
    c.mesh.update(data=1, fsdp=-1)
    c.checkpoint.update(every_steps=2000, keep_every_steps=50000)
    c.eval = dict(batch_size=1024, data_dir="")
    c.evals = dict(
        zeroshot=dict(type="zeroshot", dataset="shapes", split="validation", every_steps=10000,
                      max_examples=0, options={}),
        imagenet=dict(type="zeroshot", dataset="tfds:imagenet2012", split="validation",
                      every_steps=-1, max_examples=0, options={}))
    c.published = dict(imagenet_zero_shot_top1=0.791)
    return c
