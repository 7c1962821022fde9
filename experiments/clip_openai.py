r"""OpenAI CLIP pre-training (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), one config per image tower.

    vlm-jax compile --config experiments/clip_openai.py:B/16 --topology v5e:16x16
    vlm-jax train   --config experiments/clip_openai.py:B/32 --workdir gs://$BUCKET/runs/b32

The argument names a CLIP preset (``B/32`` default, ``B/16``, ``L/14``; ``H/14`` and ``g/14``
are open_clip's LAION towers, for planning at the same recipe). Hyper-parameters are the paper's
Table 20 (ViT rows): global batch 32,768; 32 epochs over the 400M-pair WIT dataset
(= 390,625 steps); AdamW b1 0.9, b2 0.98, eps 1e-6, decoupled weight decay 0.2 on weights
only (not gains, biases, embeddings' scale or the temperature); learning rate 5e-4 (B/32, B/16)
or 4e-4 (L/14) with 2,000 warm-up steps and a cosine decay; learnable temperature initialised
at 0.07 and clipped at 100; context length 77 with the 49,408-token BPE vocabulary; 224 px.
Published zero-shot ImageNet top-1: B/32 63.2 %, B/16 68.6 %, L/14 75.3 %.

Scale settings (not in the paper; chosen with `vlm-jax compile`, see docs/benchmarks.md):
bfloat16 compute with float32 parameters, parameters and optimizer state sharded over every
chip (``fsdp=-1``), the layer stack scanned (compile time independent of depth), every block
rematerialised (``remat='full'``: without it ViT-B/16 at 128 images per chip needs 25 GiB of
temporaries on a 16 GiB v5e) and the all-gather contrastive loss;
``--config.loss.variant=chunked`` bounds the loss's memory at much larger batches.

WIT is not public; the data section names a webdataset of (image, caption) pairs such as
LAION-400M (experiments/clip_laion400m.py).
"""

import math

from vlm_jax import configs
from vlm_jax.models.clip import clip_config

# Table 20 of the paper: learning rate per tower.
LEARNING_RATES = {"B/32": 5e-4, "B/16": 5e-4, "L/14": 4e-4, "H/14": 4e-4, "g/14": 4e-4}
PUBLISHED_ZERO_SHOT_TOP1 = {"B/32": 0.632, "B/16": 0.686, "L/14": 0.753}


def get_config(arg=None):
    tower = arg or "B/32"
    if tower not in LEARNING_RATES:
        raise ValueError(f"clip_openai.py: unknown tower {tower!r}; use one of "
                         f"{sorted(LEARNING_RATES)}.")
    c = configs.base_config()  # The defaults, and what every key means: vlm_jax/configs.py.
    c.name = f"clip_openai_{tower.replace('/', '')}"
    c.batch_size = 32768
    c.total_steps = 32 * 400_000_000 // c.batch_size  # 390,625

    # WIT is not public: point train_files at webdataset shards of (image, caption) pairs (e.g.
    # LAION-400M as img2dataset writes them, experiments/clip_laion400m.py). 'clip_bpe' is
    # OpenAI's BPE (bpe_simple_vocab_16e6.txt.gz), which ships with vlm_jax.
    # Until the ImageNet evaluator is configured, evaluation runs on the shapes splits.
    c.data.update(name="webdataset", worker_count=16,
                  train_files="gs://YOUR_BUCKET/wit400m/{00000..39999}.tar", tokenizer="clip_bpe")

    c.model = clip_config(f"ViT-{tower}")
    c.model.update(dtype="bfloat16", scan_layers=True, remat="full",
                   logit_scale_init=math.log(1 / 0.07), logit_scale_max=math.log(100.0),
                   logit_bias_init=None)
    # loss: the base's all-gathered softmax loss. optim: the base is this paper's recipe (AdamW
    # b2 0.98, eps 1e-6, weight decay 0.2, 2,000 warm-up steps, cosine, no clipping); the
    # learning rate is the tower's.
    c.optim.lr = LEARNING_RATES[tower]
    c.mesh.update(data=1, fsdp=-1)  # Parameters and optimizer state sharded over every chip.
    c.checkpoint.update(every_steps=2000, keep_every_steps=50000)
    # With ImageNet prepared for TFDS: vlm-jax eval --evaluators imagenet,imagenet_probe
    # --config.eval.data_dir=gs://YOUR_BUCKET/tensorflow_datasets (zero-shot with OpenAI's 80
    # prompts; linear probe on 50k training images); every_steps=N to run them during training.
    c.eval = dict(batch_size=1024, data_dir="")
    c.evals = dict(
        zeroshot=dict(type="zeroshot", dataset="shapes", split="validation", every_steps=10000,
                      max_examples=0, options={}),
        retrieval=dict(type="retrieval", dataset="shapes", split="validation",
                       every_steps=10000, max_examples=0, options={}),
        imagenet=dict(type="zeroshot", dataset="tfds:imagenet2012", split="validation",
                      every_steps=-1, max_examples=0, options={}),
        imagenet_probe=dict(type="linear_probe", dataset="tfds:imagenet2012", split="validation",
                            every_steps=-1, max_examples=0,
                            options=dict(probe_examples=50000, probe_split="train[:99%]",
                                         probe_val_split="train[99%:]",
                                         shots=[1, 5, 10, 25])))
    c.published = dict(imagenet_zero_shot_top1=PUBLISHED_ZERO_SHOT_TOP1.get(tower, 0.0))
    return c
