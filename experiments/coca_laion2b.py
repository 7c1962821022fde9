r"""open_clip's CoCa ViT-B/32 (and L/14) on LAION-2B: the published-size CoCa config.

    vlm-jax compile --config experiments/coca_laion2b.py --topology v5e:16x16
    vlm-jax train   --config experiments/coca_laion2b.py --workdir gs://$BUCKET/runs/coca_b32

open_clip's ``coca_ViT-B-32`` / ``coca_ViT-L-14`` (model_configs/coca_ViT-*.json: ViT image
tower with a 256-query attentional pooler, 12-layer text tower of width 512 / 768 with a CLS
token, 12-layer multimodal decoder, context 76, OpenAI's BPE), trained on LAION-2B for 13B
samples seen at global batch 90k (``laion2b_s13b_b90k``): zero-shot ImageNet-1k top-1 63.31 %
(B/32, 253.6M parameters) and 75.61 % (L/14, 638.5M), from open_clip's
docs/openclip_classification_results.csv. Loss weights 1.0 contrastive + 2.0 captioning
(open_clip's defaults). The optimiser is the CLIP recipe of experiments/clip_openai.py (AdamW
b2 0.98, eps 1e-6, weight decay 0.2, 2,000 warm-up steps, cosine; lr 5e-4 for B/32, 4e-4 for
L/14), the schedule open_clip's LAION runs use; the results table does not record CoCa's own.
LAION-2B is read as img2dataset webdataset shards.
"""

import math

from experiments import clip_openai
from vlm_jax.models.coca import coca_config

PUBLISHED_ZERO_SHOT_TOP1 = {"B/32": 0.6331, "L/14": 0.7561}


def get_config(arg=None):
    tower = arg or "B/32"
    if tower not in PUBLISHED_ZERO_SHOT_TOP1:
        raise ValueError(f"coca_laion2b.py: unknown tower {tower!r}; use one of "
                         f"{sorted(PUBLISHED_ZERO_SHOT_TOP1)}.")
    c = clip_openai.get_config("B/32" if tower == "B/32" else "L/14")
    c.name = f"coca_laion2b_{tower.replace('/', '')}"
    c.batch_size = 90112  # 'b90k': 88 x 1024
    c.total_steps = 13_000_000_000 // c.batch_size  # 's13b': 13B samples seen
    c.data.train_files = "gs://YOUR_BUCKET/laion2b/{000000..231349}.tar"
    c.model = coca_config(f"coca_ViT-{tower.replace('/', '-')}")
    c.model.update(dtype="bfloat16", scan_layers=True, remat="full",
                   logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0))
    c.model.text["context_length"] = 76  # + the CLS token = 77 positions, as open_clip
    # loss: the base's, 1.0 x contrastive (all-gathered) + 2.0 x captioning, open_clip's weights.
    c.evals.captioning = dict(c.evals.zeroshot, type="captioning", every_steps=-1,
                              options=dict(method="beam", beam_size=3))
    c.published = dict(imagenet_zero_shot_top1=PUBLISHED_ZERO_SHOT_TOP1[tower])
    return c
