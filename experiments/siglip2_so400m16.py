r"""SigLIP 2 So400m/16 at 256 px (Tschannen et al., 2025, arXiv 2502.14786): the B/16 recipe of
experiments/siglip2_b16.py with the shape-optimised So400m towers, without the LocCa decoder.

    vlm-jax compile --config experiments/siglip2_so400m16.py --topology v5p:4x8x8
    vlm-jax train   --config experiments/siglip2_so400m16.py --workdir gs://$BUCKET/runs/so400m

What differs from siglip2_b16.py, and where the figures come from:

* towers: So400m (Alabdulmohsin et al., "Getting ViT in Shape", arXiv 2305.13035): width
  1152, depth 27, MLP 4304, 16 heads, for the image tower and, as in SigLIP's So400m models,
  the text tower too. The shape is the "So400m" row of ``vlm_jax.models.vit.VARIANTS`` (big_vision's numbers). Patch 16 at 256
  px: 256 patches, the sequence length of every SigLIP 2 size. The embedding is the MAP-pooled
  image feature (width 1152).
* self-distillation and masked prediction: the So400m size factor 1.0 (B's is 0.25), so weights
  1 and 0.25 (Sec. 2.3 as we read it; the same caveat as in siglip2_b16.py). The DINO heads
  keep B/16's sizes (hidden 2048, bottleneck 256, 65,536 prototypes).
* published zero-shot ImageNet top-1 of SigLIP 2 So400m/16 at 256 px: 83.4 %. This is the
  paper's Table 1 as the released model's card (google/siglip2-so400m-patch16-256)
  reproduces it; not re-checked against the paper itself.

Batch 32k, 40B examples, the optimiser, the schedule and the scale settings are B/16's.
``vlm-jax compile --topology v5p:4x8x8 --grad_accum_steps 1`` (256 chips, 128 images each, both
SSL terms compiled): 1,183.4M parameters (with the two 65,536-prototype heads), peak 87.7 of
the 95 GiB per chip (92.3 %): it fits, with little headroom (978 s to compile on a loaded
2-core machine). SigLIP 2 itself trained on up to 2,048 v5e chips.
"""

from experiments import siglip2_b16
from vlm_jax.models import vit


def get_config(arg=None):
    if arg is not None:
        raise ValueError(f"siglip2_so400m16.py takes no argument, got {arg!r}.")
    c = siglip2_b16.get_config()
    c.name = "siglip2_so400m16"
    width, depth, mlp_dim, num_heads = vit.VARIANTS["So400m"]  # 1152, 27, 4304, 16
    tower = dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim)
    c.model.image.update(tower)
    c.model.text.update(tower)
    c.model.embed_dim = width
    size_factor = 1.0  # So400m
    c.loss.update(self_distill_weight=1.0 * size_factor, masked_pred_weight=0.25 * size_factor)
    c.published = dict(imagenet_zero_shot_top1=0.834)
    return c
