"""SigLIP 2's self-supervised terms: SILC self-distillation and TIPS masked prediction.

Tschannen et al., "SigLIP 2" (arXiv 2502.14786, Sec. 2.3) add two losses to SigLIP's sigmoid
loss for the last 20 % of training:

* **Local-to-global self-distillation** (SILC, Naeem et al., arXiv 2310.13355): an EMA teacher
  sees a global view of the image, the student sees local crops; the student's pooled feature,
  through a projection head onto ``K`` prototypes, is trained to predict the teacher's
  distribution over the prototypes (DINO's cross-entropy, Caron et al. 2021).
* **Masked prediction** (TIPS, Maninis et al., arXiv 2410.16512): the student sees the global
  view with a fraction of its patch tokens replaced by a learned mask token and predicts, at the
  masked positions, the teacher's per-patch prototype distribution (iBOT's loss, Zhou et al.
  2022) on the unmasked view.

The teacher's distributions are normalised with Sinkhorn-Knopp (DINOv2's and TIPS's choice)
rather than DINO's running centre: the centre is extra state updated from the teacher's
outputs, Sinkhorn-Knopp is a function of the batch alone.

Every function here is written for a batch sharded over the mesh's batch axes (``data``,
``fsdp``) under ``jax.jit``: the per-example terms are elementwise and the only cross-example
reductions (the Sinkhorn-Knopp marginals, the means) are ``jnp.sum`` over the global batch
axis, which XLA's partitioner lowers to an all-reduce. The sharded value therefore equals the
one-device value (tests/test_distill.py checks it on 8 devices); no ``shard_map`` is needed
because nothing here builds a B x B matrix, unlike the contrastive losses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def sinkhorn_knopp(teacher_logits: jax.Array, temperature: float, iterations: int = 3
                   ) -> jax.Array:
    """Teacher targets ``[..., K]``: ``softmax(logits / temperature)`` balanced over the
    prototypes by Sinkhorn-Knopp (DINOv2's ``sinkhorn_knopp_teacher``; Caron et al. 2020).

    All leading axes are samples (the global batch, or batch x masked patches): each
    prototype gets ``1 / K`` of the total mass, each sample a distribution summing to 1.
    The global maximum is subtracted before ``exp`` (a constant factor the normalisation
    removes) so that a sharp temperature (0.04) cannot overflow float32.
    """
    x = teacher_logits.astype(jnp.float32) / temperature
    k = x.shape[-1]
    q = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x)))
    flat = q.reshape(-1, k)
    n = flat.shape[0]
    flat = flat / jnp.sum(flat)
    for _ in range(iterations):
        flat = flat / jnp.sum(flat, axis=0, keepdims=True) / k  # each prototype: mass 1/K
        flat = flat / jnp.sum(flat, axis=1, keepdims=True) / n  # each sample: mass 1/N
    return jax.lax.stop_gradient((flat * n).reshape(q.shape))


def _cross_entropy(targets: jax.Array, student_logits: jax.Array, temperature: float
                   ) -> jax.Array:
    """``-sum_k targets_k log softmax(student / temperature)_k`` over the last axis."""
    logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(targets * logp, axis=-1)


def self_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
                           student_temp: float = 0.1, teacher_temp: float = 0.04,
                           sinkhorn_iterations: int = 3) -> jax.Array:
    """SILC's local-to-global consistency: the mean over local views and images of the
    cross-entropy between the teacher's (Sinkhorn-Knopp) distribution on the global view and
    the student's softmax on each local view.

    Args:
      student_logits: ``[V, B, K]`` prototype logits of the student's ``V`` local views.
      teacher_logits: ``[B, K]`` prototype logits of the teacher's global view (no gradient).
      student_temp / teacher_temp: softmax temperatures (DINO's 0.1 / 0.04).
    """
    if student_logits.ndim != 3 or teacher_logits.ndim != 2 or \
            student_logits.shape[1:] != teacher_logits.shape:
        raise ValueError(f"self_distillation_loss: student [V, B, K] and teacher [B, K], got "
                         f"{student_logits.shape} and {teacher_logits.shape}.")
    targets = sinkhorn_knopp(teacher_logits, teacher_temp, sinkhorn_iterations)
    return jnp.mean(_cross_entropy(targets[None], student_logits, student_temp))


def masked_prediction_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                           mask: jax.Array, *, student_temp: float = 0.1,
                           teacher_temp: float = 0.04, sinkhorn_iterations: int = 3
                           ) -> jax.Array:
    """TIPS / iBOT masked prediction: at the masked patches, the cross-entropy between the
    teacher's (Sinkhorn-Knopp) per-patch distribution on the unmasked view and the student's
    on the masked view; the mean over the masked patches of the batch.

    Args:
      student_logits, teacher_logits: ``[B, N, K]`` per-patch prototype logits.
      mask: ``[B, N]`` bool, True where the student's patch was masked. The Sinkhorn-Knopp
        marginals are taken over the masked patches only (as DINOv2 does for its iBOT term).
    """
    if student_logits.shape != teacher_logits.shape or mask.shape != student_logits.shape[:2]:
        raise ValueError(f"masked_prediction_loss: student and teacher [B, N, K], mask [B, N]; "
                         f"got {student_logits.shape}, {teacher_logits.shape}, {mask.shape}.")
    m = mask.astype(jnp.float32)
    k = teacher_logits.shape[-1]
    # Sinkhorn-Knopp over the masked patches: unmasked ones get zero mass (exp(-inf) = 0).
    x = teacher_logits.astype(jnp.float32) / teacher_temp
    x = jnp.where(mask[..., None], x, -jnp.inf)
    q = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x)))
    n = jnp.sum(m)
    q = q / jnp.sum(q)
    for _ in range(sinkhorn_iterations):
        q = q / jnp.sum(q, axis=(0, 1), keepdims=True) / k
        q = jnp.where(mask[..., None], q / jnp.maximum(jnp.sum(q, -1, keepdims=True), 1e-30),
                      0.0) / n
    targets = jax.lax.stop_gradient(q * n)
    ce = _cross_entropy(targets, student_logits, student_temp)
    return jnp.sum(ce * m) / jnp.maximum(n, 1.0)


def ema_update(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
    """``momentum * teacher + (1 - momentum) * student``, leaf by leaf
    (``optax.incremental_update``), in each teacher leaf's dtype."""
    return optax.incremental_update(student, teacher, step_size=1.0 - momentum)


def random_crops(images: jax.Array, rng: jax.Array, size: int, scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
    """Random-resized crops on the device, one per image: ``images [B, H, W, C]`` (uint8 or
    float) -> ``[B, size, size, C]`` of the input's dtype (uint8 rounded) and value range.

    Each crop covers a fraction of the image area drawn uniformly from ``scale`` with a
    log-uniform aspect ratio from ``ratio`` (torchvision's RandomResizedCrop, without its
    retries: the side lengths are clipped to the image instead), then is resampled bilinearly
    to ``size`` with ``jax.image.scale_and_translate``, which resizes and crops in one pass.
    The random draws are per image and depend only on ``rng`` and the image's index, so the
    crops of a sharded batch equal those of one device.
    """
    b, h, w, c = images.shape
    k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
    area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1]) * (h * w)
    logr = jax.random.uniform(k_ratio, (b,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    r = jnp.exp(logr)
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    y0 = jax.random.uniform(k_y, (b,)) * (h - ch)
    x0 = jax.random.uniform(k_x, (b,)) * (w - cw)

    def one(img, y0, x0, ch, cw):
        s = jnp.stack([size / ch, size / cw])
        t = -jnp.stack([y0, x0]) * s
        return jax.image.scale_and_translate(img.astype(jnp.float32), (size, size, c), (0, 1),
                                             s, t, method="linear", antialias=True)

    out = jax.vmap(one)(images, y0, x0, ch, cw)
    if jnp.issubdtype(images.dtype, jnp.integer):  # uint8 pixels stay pixels (normalised later)
        out = jnp.clip(jnp.round(out), 0, 255).astype(images.dtype)
    return out


def random_patch_mask(rng: jax.Array, batch: int, num_patches: int, ratio: float) -> jax.Array:
    """``[batch, num_patches]`` bool, exactly ``round(ratio * num_patches)`` True per row at
    uniformly random positions (a random permutation per image, as TIPS / iBOT's random
    masking): the masked count is the same for every image, so the mean over masked patches
    is a mean over images of per-image means."""
    n_mask = int(round(ratio * num_patches))
    if not 0 < n_mask <= num_patches:
        raise ValueError(f"random_patch_mask: ratio={ratio} masks {n_mask} of {num_patches} "
                         "patches; choose a ratio in (0, 1].")
    scores = jax.random.uniform(rng, (batch, num_patches))
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    return ranks < n_mask


__all__ = ["ema_update", "masked_prediction_loss", "random_crops", "random_patch_mask",
           "self_distillation_loss", "sinkhorn_knopp"]
