r"""open_clip's CLIP ViT-B/32 on LAION-400M at global batch 32,768 (Cherti et al., 2023,
"Reproducible scaling laws for contrastive language-image learning"; open_clip README).

    vlm-jax compile --config experiments/clip_laion400m.py --topology v5e:16x16

open_clip trained ViT-B/32 on LAION-400M with 128 A100s at 256 per GPU (global batch 32,768)
for 32 epochs and reached 62.96 % zero-shot ImageNet top-1 (OpenAI's WIT-trained B/32: 63.2 %);
the recipe is OpenAI's (experiments/clip_openai.py: AdamW b2 0.98 eps 1e-6, weight decay 0.2,
lr 5e-4, 2,000 warm-up steps, cosine, temperature 0.07 clipped at 100). The arguments ``B/16``
(67.07 %) and ``L/14`` (72.77 %) select open_clip's larger LAION-400M runs at the same recipe.

LAION-400M is distributed as img2dataset webdataset tar shards (41,408 shards of ~10k pairs).
"""

from experiments import clip_openai

PUBLISHED_ZERO_SHOT_TOP1 = {"B/32": 0.6296, "B/16": 0.6707, "L/14": 0.7277}


def get_config(arg=None):
    tower = arg or "B/32"
    if tower not in PUBLISHED_ZERO_SHOT_TOP1:
        raise ValueError(f"clip_laion400m.py: unknown tower {tower!r}; use one of "
                         f"{sorted(PUBLISHED_ZERO_SHOT_TOP1)}.")
    c = clip_openai.get_config(tower)
    c.name = f"clip_laion400m_{tower.replace('/', '')}"
    c.total_steps = 32 * 407_000_000 // c.batch_size  # 32 epochs of LAION-400M (~407M pairs).
    c.data.train_files = "gs://YOUR_BUCKET/laion400m/{00000..41407}.tar"
    c.published.imagenet_zero_shot_top1 = PUBLISHED_ZERO_SHOT_TOP1[tower]
    return c
