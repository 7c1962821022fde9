r"""SigLIP with LocCa's decoder on the embedded "shapes" dataset (SigLIP 2's decoder-based
pretraining): ``siglip_tiny`` plus a small decoder trained jointly from the first step.

    vlm-jax train --config experiments/locca_tiny_shapes.py --workdir runs/locca_tiny
    vlm-jax train --config experiments/locca_tiny_shapes.py:siglip2 --workdir runs/siglip2_locca

``:siglip2`` adds SigLIP 2's self-distillation and masked prediction for the last 20 % of
training, exactly as ``experiments/siglip2_tiny_shapes.py`` (whose sources are in that file):
the full SigLIP 2 recipe at this scale. ``:test`` and ``:siglip2_test`` are seconds-long smoke
variants (``siglip_tiny``'s ``:test`` towers).

What is taken from where (Tschannen et al., "SigLIP 2", arXiv 2502.14786, Sec. 2.2; Wan et al.,
"LocCa: Visual Pretraining with Location-aware Captioners", arXiv 2403.19596):

* a standard transformer decoder cross-attending to the image tower's *un-pooled* output
  tokens, trained jointly with the sigmoid loss from the start, and discarded for the release
  of the encoders: SigLIP 2, Sec. 2.2. The decoder here is CoCa's stack
  (``vlm_jax/models/coca.py``: causal self-attention, cross-attention, an MLP each, per layer).
* the three tasks, captioning (Cap), automatic referring-expression prediction (ARef: the box
  of the region an expression names) and grounded captioning (GCap: the caption of a box), and
  boxes written as quantised coordinate tokens: LocCa, Sec. 3 / Fig. 1, as SigLIP 2 Sec. 2.2
  uses them. SigLIP 2's region-expression pairs come from n-gram extraction and an
  open-vocabulary detector on WebLI; here they are the shapes records' exact boxes, referring
  expressions and grounded captions (``docs/data.md`` section 9).
* CapPa's parallel prediction (all target inputs replaced by a mask token, attention both
  ways; Tschannen et al. arXiv 2306.07915, big_vision ``models/proj/cappa/cappa.py``) for 50 %
  of the decoder's examples: SigLIP 2, Sec. 2.2 as the issue states it; not re-checked against
  the paper's text here (unverified).
* a decoder with fewer layers than the text tower: SigLIP 2, Sec. 2.2 (as we read it); here 2
  layers against the text tower's 4, same width.
* the number of coordinate bins: LocCa quantises coordinates into integer bins (Pix2Seq-style);
  the count used there could not be re-checked (``model.decoder.num_bins`` defaults to 500, the
  figure usually quoted: unverified). This 64 px model uses 64 bins, one per pixel, so the
  quantisation error is at most half a pixel.
* one task per example, drawn uniformly (``loss.locca_task_weights`` 1 / 1 / 1) with one
  object per ARef / GCap example; the decoder's loss weight 1.0 against 1.0 for the sigmoid
  loss. Neither paper's text could be re-checked for these (LocCa may run all three tasks per
  image): stated choices, unverified.

Box tokens are ``(ymin, xmin, ymax, xmax)``, the shapes records' order; the ARef expression is a
field of ``expression_length`` 12 tokens (the longest shapes expression has 11), so that every
ARef prompt has one length (``vlm_jax/models/locca.py``).
"""

from experiments import siglip2_tiny_shapes, siglip_tiny

VARIANTS = (None, "test", "siglip2", "siglip2_test")


def get_config(arg=None):
    if arg not in VARIANTS:
        raise ValueError(f"locca_tiny_shapes.py: unknown variant {arg!r} (use one of "
                         f"{[v for v in VARIANTS if v]} or nothing).")
    test = arg in ("test", "siglip2_test")
    base = "test" if test else None
    c = (siglip2_tiny_shapes if arg in ("siglip2", "siglip2_test") else siglip_tiny
         ).get_config(base)
    c.name = "siglip2_locca_tiny_shapes" if "siglip2" in (arg or "") else "locca_tiny_shapes"
    c.model.name = "locca"
    if test:
        c.model.decoder = dict(width=32, depth=1, num_heads=2, mlp_dim=64, num_bins=32,
                               expression_length=12, max_length=24, bos_id=2)
    else:
        c.model.decoder = dict(width=128, depth=2, num_heads=4, mlp_dim=512, num_bins=64,
                               expression_length=12, max_length=24, bos_id=2)
    c.loss.update(locca_weight=1.0, locca_task_weights=[1.0, 1.0, 1.0],
                  locca_parallel_fraction=0.5)
    every = min(e.every_steps for e in c.evals.values() if e.every_steps >= 0)
    size = 128 if test else 0
    c.evals.captioning = dict(type="captioning", dataset="shapes", split="test",
                              every_steps=every, max_examples=size,
                              options=dict(method="greedy"))
    c.evals.refexp = dict(type="refexp", dataset="shapes", split="test", every_steps=every,
                          max_examples=size, options={})
    return c
