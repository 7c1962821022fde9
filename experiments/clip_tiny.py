r"""A tiny CLIP trained on the embedded "shapes" dataset: the quickstart, minutes on a laptop CPU.

    vlm-jax train --config experiments/clip_tiny.py --workdir runs/clip_tiny

The towers are small transformers (width 128, 4 layers; ViT patch 16 on 64 px images, i.e. 16
patches) with CLIP's recipe: AdamW (b2 0.98, eps 1e-6, decay 0.2 off gains/biases/temperature),
warm-up + cosine, temperature initialised at 1/0.07 and clamped at 100. Arguments after ':'
select a variant: ``clip_tiny.py:test`` is a seconds-long smoke config used by the tests.
"""

import math

import ml_collections

from vlm_jax import parallel


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "clip_tiny"
    c.seed = 0
    c.total_steps = 1200
    c.batch_size = 128
    c.log_every_steps = 20

    # name: 'shapes' (embedded, built on first use) or raw image-text shards, 'webdataset' /
    # 'array_record', read from train_files (brace ranges and globs; local or gs://) and
    # evaluated on the shapes splits (eval_name, config_name). tokenizer: a sentencepiece model
    # file for raw shards ('' = the shapes tokenizer). Bad samples are skipped and counted; the
    # run stops when more than max_skipped_fraction of them are.
    c.data = dict(name="shapes", config_name="64px", data_dir="", num_train=0, worker_count=0,
                  train_files="", tokenizer="", eval_name="shapes", max_skipped_fraction=0.1,
                  min_side=8, mixture=[],  # mixture: [dict(name, train_files, weight), ...]
                  image_key="image", caption_key="caption")  # name='tfds': feature names

    c.model = dict(
        name="clip",
        embed_dim=128,
        image=dict(image_size=64, patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=512,
                   pool_type="tok", pre_norm=True, patch_bias=False, act="gelu"),
        text=dict(width=128, depth=4, num_heads=4, mlp_dim=512, vocab_size=512,
                  context_length=24, eos_id=3, act="gelu"),
        logit_scale_init=math.log(1 / 0.07),
        logit_scale_max=math.log(100.0),
        logit_bias_init=None,  # a float adds SigLIP's learned bias (experiments/siglip_tiny.py)
        dtype="float32",
        remat="none",
        scan_layers=False,
    )
    # softmax (CLIP) or sigmoid (SigLIP); variant: how the loss is distributed over devices
    # (gather | ring | chunked; chunk_size for chunked, 0 = default). See vlm_jax/losses.py.
    c.loss = dict(name="softmax", variant="gather", chunk_size=0)
    c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                   warmup_steps=100, schedule="cosine", end_lr_factor=0.0, grad_clip_norm=1.0,
                   grad_accum_steps=1)
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
    c.axis_rules = [list(r) for r in parallel.DEFAULT_RULES]
    # Saved every every_steps (and on SIGTERM, at the end); the newest `keep` are kept, plus every
    # keep_every_steps-th (0 = none) for later evaluation. allow_data_change: resume although
    # data.train_files / mixture / tokenizer differ from the checkpoint's (refused otherwise).
    c.checkpoint = dict(every_steps=200, keep=3, keep_every_steps=0, async_save=True,
                        allow_data_change=False)
    # A NaN/Inf loss or gradient: 'stop' the run (the last good checkpoint is kept) or 'skip'
    # the step (parameters and optimizer state unchanged), stopping after
    # max_consecutive_skips bad steps in a row.
    c.guard = dict(nonfinite="stop", max_consecutive_skips=10)
    # Trace steps start_step .. start_step+num_steps-1 with jax.profiler into <workdir>/profile
    # (num_steps=0: off). See vlm_jax/profiling.py.
    c.profile = dict(start_step=0, num_steps=0)
    # Shared by every evaluation: the feature-extraction batch and the directory of 'tfds:<name>'
    # datasets. Each entry of c.evals is one evaluation, results keyed <entry>/<metric>
    # (vlm_jax/evaluation.py): dataset 'shapes' or 'tfds:<name>' (imagenet2012, cifar10,
    # coco_captions...); every_steps N (and at the end), 0 (at the end), -1 (on request:
    # vlm-jax eval --evaluators linear_probe). linear_probe fits on probe_examples images of
    # probe_split, picks its regularisation on probe_val_split, and adds few-shot ridge probes.
    c.eval = dict(batch_size=256, data_dir="")
    c.evals = dict(
        zeroshot=dict(type="zeroshot", dataset="shapes", split="test", every_steps=400,
                      max_examples=0, options={}),
        retrieval=dict(type="retrieval", dataset="shapes", split="test", every_steps=400,
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
        c.model.image.update(image_size=32, width=32, depth=1, num_heads=2, mlp_dim=64)
        c.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
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
