r"""A tiny LLaMA-style language model pretrained on the shapes texts: Flamingo's frozen LM.

    vlm-jax train --config experiments/lm_tiny_shapes.py --workdir runs/lm_tiny

Documents are the texts of the interleaved shapes documents without their images
(input_pipeline/interleaved.py): runs of captions, or of ``question: ... answer: ...`` pairs with
one answer style per document. The model is a 4-layer decoder (width 128, RMSNorm, rotary
embeddings, SwiGLU) with the optimiser of LLaMA (AdamW b2 0.95, weight decay 0.1, clipping at
1.0, warm-up + cosine). Minutes on a CPU; ``:test`` is a seconds-long smoke variant.
"""

import ml_collections

from vlm_jax import parallel


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "lm_tiny_shapes"
    c.seed = 0
    c.total_steps = 500
    c.batch_size = 32
    c.log_every_steps = 50

    # The interleaved shapes documents (text only for the LM): up to max_images chunks per
    # document, docs_per_row documents packed into each row of seq_length tokens.
    c.data = dict(name="shapes", config_name="64px", data_dir="", num_train=0, worker_count=0,
                  max_images=5, seq_length=128, docs_per_row=8)
    # ---- Document sources other than shapes (defaults; to move into the base config) ----
    # name='tfds' | 'jsonl' | 'array_record': a text corpus for the LM (input_pipeline/text.py);
    # name='webdataset': OBELICS / MMC4-layout document tars for Flamingo
    # (input_pipeline/interleaved.py). train_files / eval_files: paths with {a..b} ranges, globs
    # and commas, local or gs:// ('<name>@<split>' for tfds, a dataset prepared in data_dir);
    # eval_files: the held-out text of the lm_loss evaluator. text_key: the JSON field / TFDS
    # feature of the text. record_format (array_record): 'text' (a record is the UTF-8 text) or
    # 'json' (a JSON object with text_key). tokenizer: a sentencepiece .model ('' = the shapes
    # LM tokenizer). min_image_similarity: MMC4 images matched to their sentence below this
    # CLIP similarity are left out (open_flamingo trains with 0.24-0.32).
    c.data.update(train_files="", eval_files="", text_key="text", record_format="text",
                  tokenizer="", min_image_similarity=0.0, min_side=8, max_skipped_fraction=0.1)
    # Vocabulary 512 >= the 402 pieces of the shapes LM tokenizer (ids 0-3: pad, unk, bos, eos).
    c.model = dict(name="lm", style="llama", vocab_size=512, width=128, depth=4, num_heads=4,
                   num_kv_heads=4, mlp_dim=352, max_length=160, norm_eps=1e-6,
                   rope_theta=10000.0, tie_embeddings=False, bos_id=2, eos_id=3, pad_id=0,
                   dtype="float32", remat="none")
    c.optim = dict(name="adamw", lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                   warmup_steps=50, schedule="cosine", end_lr_factor=0.1, grad_clip_norm=1.0,
                   grad_accum_steps=1, trainable="")
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
    c.axis_rules = [list(r) for r in parallel.DEFAULT_RULES]
    c.checkpoint = dict(every_steps=500, keep=2, keep_every_steps=0, async_save=True,
                        allow_data_change=False)
    c.guard = dict(nonfinite="stop", max_consecutive_skips=10)
    # Trace steps start_step .. start_step+num_steps-1 with jax.profiler into <workdir>/profile
    # (num_steps=0: off). See vlm_jax/profiling.py.
    c.profile = dict(start_step=0, num_steps=0)
    # Held-out loss / perplexity on 256 documents of the validation split.
    c.eval = dict(every_steps=0, evaluators=["lm_loss"], split="validation", batch_size=64,
                  max_examples=256, dataset="")

    if arg == "test":
        c.total_steps = 4
        c.batch_size = 8
        c.log_every_steps = 2
        c.data.update(config_name="32px", seq_length=48, docs_per_row=4)
        c.model.update(width=32, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=64)
        c.optim.warmup_steps = 1
        c.checkpoint.every_steps = 2
        c.eval.max_examples = 16
    elif arg is not None:
        raise ValueError(f"lm_tiny_shapes.py: unknown variant {arg!r} (use 'test' or nothing).")
    return c
