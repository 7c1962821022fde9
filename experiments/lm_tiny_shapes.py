r"""A tiny LLaMA-style language model pretrained on the shapes texts: Flamingo's frozen LM.

    vlm-jax train --config experiments/lm_tiny_shapes.py --workdir runs/lm_tiny

Documents are the texts of the interleaved shapes documents without their images
(input_pipeline/interleaved.py): runs of captions, or of ``question: ... answer: ...`` pairs with
one answer style per document. The model is a 4-layer decoder (width 128, RMSNorm, rotary
embeddings, SwiGLU) with the optimiser of LLaMA (AdamW b2 0.95, weight decay 0.1, clipping at
1.0, warm-up + cosine). Minutes on a CPU; ``:test`` is a seconds-long smoke variant.
"""

from vlm_jax import configs


def get_config(arg=None):
    c = configs.base_config()  # The defaults, and what every key means: vlm_jax/configs.py.
    c.name = "lm_tiny_shapes"
    c.total_steps = 500
    c.batch_size = 32
    c.log_every_steps = 50

    # The interleaved shapes documents (text only for the LM): up to data.max_images (5) chunks
    # per document, docs_per_row documents packed into each row of seq_length tokens.
    c.data.update(seq_length=128, docs_per_row=8)
    # Vocabulary 512 >= the 402 pieces of the shapes LM tokenizer (ids 0-3: pad, unk, bos, eos).
    c.model = dict(name="lm", style="llama", vocab_size=512, width=128, depth=4, num_heads=4,
                   num_kv_heads=4, mlp_dim=352, max_length=160, norm_eps=1e-6,
                   rope_theta=10000.0, tie_embeddings=False, bos_id=2, eos_id=3, pad_id=0,
                   dtype="float32", remat="none")
    # LLaMA's optimiser: AdamW b2 0.95, eps 1e-8, weight decay 0.1, clipping at 1.0, cosine to
    # 10 % of the peak.
    c.optim.update(lr=3e-3, b2=0.95, eps=1e-8, weight_decay=0.1, warmup_steps=50,
                   end_lr_factor=0.1, grad_clip_norm=1.0)
    c.checkpoint.update(every_steps=500, keep=2)
    # Held-out loss / perplexity on 256 documents of the validation split.
    c.eval = dict(batch_size=64, data_dir="")
    c.evals = dict(lm_loss=dict(type="lm_loss", dataset="shapes", split="validation",
                                every_steps=0, max_examples=256, options={}))

    if arg == "test":
        c.total_steps = 4
        c.batch_size = 8
        c.log_every_steps = 2
        c.data.update(config_name="32px", seq_length=48, docs_per_row=4)
        c.model.update(width=32, depth=2, num_heads=2, num_kv_heads=1, mlp_dim=64)
        c.optim.warmup_steps = 1
        c.checkpoint.every_steps = 2
        c.evals.lm_loss.max_examples = 16
    elif arg is not None:
        raise ValueError(f"lm_tiny_shapes.py: unknown variant {arg!r} (use 'test' or nothing).")
    return c
