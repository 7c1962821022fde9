r"""A tiny CoCa (contrastive captioner) trained on the embedded "shapes" dataset, on a CPU.

    vlm-jax train --config experiments/coca_tiny_shapes.py --workdir runs/coca_tiny
    vlm-jax caption --workdir runs/coca_tiny --images my_pictures/

Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models" (2022), as open_clip
implements it (vlm_jax/models/coca.py): the ViT's tokens go through one attentional pooler whose
first query is the contrastive image embedding and whose other queries are the captioning
decoder's context; a causal text tower with a CLS token appended gives the text embedding; a
multimodal decoder (causal self-attention + cross-attention to the image context) predicts the
caption. Loss = 1.0 x contrastive (the all-gather loss) + 2.0 x captioning cross-entropy, as
open_clip. The sizes and the optimiser are those of clip_tiny's first recipe
(``clip_tiny.first_recipe``, with which this config's figures were measured; the text depth is
split between the unimodal text tower and the decoder); evaluation adds CIDEr / BLEU-4 /
ROUGE-L of greedy captions on the shapes test split. ``:test`` is a seconds-long smoke variant
for the tests.
"""

from experiments import clip_tiny


def get_config(arg=None):
    c = clip_tiny.get_config(arg)
    if arg is None:  # the recipe this config's figures were measured with
        clip_tiny.first_recipe(c)
    c.name = "coca_tiny_shapes"
    clip = c.model
    image = {k: v for k, v in clip.image.items() if k != "pool_type"}
    text = dict(clip.text)
    text.update(depth=max(1, text["depth"] // 2), bos_id=2, pad_id=0)  # the shapes tokenizer
    c.model = dict(
        name="coca",
        embed_dim=clip.embed_dim,
        image=image,
        text=text,
        decoder=dict(depth=max(1, clip.text.depth // 2)),
        # One query for the contrastive embedding + one per image token for the decoder.
        pooler=dict(n_queries=(image["image_size"] // image["patch_size"]) ** 2 + 1,
                    num_heads=image["num_heads"], mode="single"),
        logit_scale_init=clip.logit_scale_init,
        logit_scale_max=clip.logit_scale_max,
        dtype=clip.dtype, remat=clip.remat, scan_layers=clip.scan_layers)
    # loss: the base's, 1.0 x contrastive (all-gathered) + 2.0 x captioning, open_clip's weights.
    # Captions for the captioning evaluator: greedy, or options=dict(method='beam', beam_size=3).
    c.evals.captioning = dict(c.evals.zeroshot, type="captioning", options=dict(method="greedy"))
    return c
