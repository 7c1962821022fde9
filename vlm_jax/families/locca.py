"""LocCa: SigLIP (or CLIP) trained jointly with a location-aware captioning decoder, SigLIP 2's
decoder-based pretraining (Tschannen et al. 2025, Sec. 2.2; Wan et al. 2024).

The model is :class:`vlm_jax.models.locca.LocCa`: the CLIP family's model with a decoder that
cross-attends to the image tower's un-pooled tokens (CoCa's decoder stack). The objective is
the CLIP family's (``config.loss.name``: sigmoid for SigLIP 2; and its SigLIP 2 switches
``loss.self_distill_weight`` / ``loss.masked_pred_weight``) plus ``loss.locca_weight`` x the
decoder's cross-entropy on the batch's Cap / ARef / GCap sequences
(:class:`input_pipeline.locca.LoccaTargets`, drawn per example from the shapes records'
boxes and referring expressions). The decoder's term is per micro-batch (it goes in
:func:`embed`, as CoCa's captioning term), so the contrastive loss micro-batched over the
embeddings keeps every negative. The decoder serves the ``caption`` capability (from ``bos``)
and ``locate`` (ARef prompts, boxes read greedily) for the ``refexp`` evaluator; SigLIP 2
discards it when the encoders are released.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from input_pipeline import pipeline
from input_pipeline.locca import LoccaTargets
from vlm_jax import data as data_lib
from vlm_jax.config import ConfigError
from vlm_jax.families import Family
from vlm_jax.families import clip
from vlm_jax.models import locca as locca_model


def build_model(model_cfg, rngs):
    """:class:`~vlm_jax.models.locca.LocCa` from ``config.model`` (dict or ConfigDict)."""
    return locca_model.LocCa.from_config(model_cfg, rngs=rngs)


def embed(model, batch, config):
    """The embeddings of a (micro-)batch (one image-tower pass also gives the decoder's image
    tokens) and its decoder term: ``locca_weight`` x the cross-entropy of the target tokens (a
    mean over the micro-batch's target tokens), with the per-task losses as metrics."""
    image_emb, tokens = model.image_features(batch["image"])
    text_emb = model.encode_text(batch["text"])
    labels, target = batch["locca_labels"], batch["locca_target"]
    logits = model.decoder_logits(tokens, labels, target, batch["locca_parallel"])
    loss = locca_model.sequence_loss(logits, labels, target)
    lay = model.layout
    first = labels[:, :1]
    metrics = {"train/locca_loss": loss}
    for name, rows in (("cap", (first != lay.aref_id) & (first != lay.gcap_id)),
                       ("aref", first == lay.aref_id), ("gcap", first == lay.gcap_id)):
        metrics[f"train/locca_{name}_loss"] = locca_model.sequence_loss(logits, labels,
                                                                        target & rows)
    emb = {"image_emb": image_emb, "text_emb": text_emb}
    return emb, config.loss.locca_weight * loss, metrics


def objective(model, batch, config, mesh, ctx=None):
    """The CLIP family's objective (contrastive loss, SigLIP 2's self-supervised terms when on)
    with the decoder's term (:func:`embed`)."""
    return clip.objective(model, batch, config, mesh, ctx, embed_fn=embed)


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
    """CLIP's pairs plus the decoder's ``locca_labels`` int32 ``[B, L]``, ``locca_target`` bool
    ``[B, L]`` (the scored labels) and ``locca_parallel`` bool ``[B]``."""
    spec = clip.batch_spec(config)
    b, length = config.batch_size, locca_model.token_layout(config.model).max_length
    spec.update(locca_labels=jax.ShapeDtypeStruct((b, length), np.int32),
                locca_target=jax.ShapeDtypeStruct((b, length), np.bool_),
                locca_parallel=jax.ShapeDtypeStruct((b,), np.bool_))
    return spec


@dataclasses.dataclass
class LoccaData(data_lib.Data):
    """The shapes pairs with the decoder's targets (:class:`LoccaTargets`)."""

    def targets(self) -> LoccaTargets:
        """The per-example task draws of this run's config."""
        lc = self.config.loss
        return LoccaTargets(self.tokenizer, locca_model.token_layout(self.config.model),
                            task_weights=tuple(lc.locca_task_weights),
                            parallel_fraction=float(lc.locca_parallel_fraction))

    def train_iterator(self):
        """This process's share of the training stream, with the decoder's targets."""
        c = self.config
        return pipeline.create_train_iterator(
            data_dir=self.data_dir, dataset=c.data.name, config_name=c.data.config_name,
            split="train", global_batch_size=c.batch_size, seed=c.seed,
            context_length=c.model.text.context_length, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=c.data.worker_count,
            image_size=c.model.image.image_size, targets=self.targets())


def make_data(config, for_eval: bool = False):
    """The shapes pairs (:func:`vlm_jax.data.prepare`) with LocCa's targets.

    Raises:
        ConfigError: a source without boxes (``data.name`` other than ``'shapes'``), or a
            ``model.decoder.bos_id`` other than the tokenizer's.
    """
    if config.data.name != "shapes":
        raise ConfigError(f"config.data.name={config.data.name!r}: the LocCa decoder's ARef / "
                          "GCap targets need boxes and referring expressions, which only the "
                          "shapes records (1.2.0) carry here; use data.name='shapes'.")
    d = data_lib.prepare(config, for_eval=for_eval)
    lay = locca_model.token_layout(config.model)
    tok = d.tokenizer
    if (tok.bos_id, tok.eos_id, tok.pad_id) != (lay.bos_id, lay.eos_id, lay.pad_id):
        raise ConfigError(f"model.decoder.bos_id / model.text.eos_id = {lay.bos_id} / "
                          f"{lay.eos_id} (pad {lay.pad_id}), but the tokenizer's bos / eos / pad "
                          f"are {tok.bos_id} / {tok.eos_id} / {tok.pad_id}: set them to these.")
    return LoccaData(d.config, d.data_dir, d.tokenizer, d.source)


def default_evals(config) -> dict[str, dict]:
    """CLIP's zero-shot and retrieval, greedy captioning and referring-expression localisation
    (boxes at IoU 0.5) on the shapes test split."""
    return {**clip.default_evals(config),
            "captioning": clip.eval_entry("captioning", method="greedy"),
            "refexp": clip.eval_entry("refexp")}


def flops_per_example(model_cfg, batch_size: int | None = None) -> float:
    """Forward matmul FLOPs per example (:func:`vlm_jax.models.locca.locca_flops`)."""
    return float(locca_model.locca_flops(model_cfg, batch_size=batch_size))


FAMILY = Family(name="locca", build_model=build_model, objective=objective,
                batch_spec=batch_spec, make_data=make_data, default_evals=default_evals,
                flops_per_example=flops_per_example,
                capabilities=frozenset({"embed", "caption", "locate"}),
                image_size=clip.image_size, embed=embed, batch_loss=clip.batch_loss,
                after_update=clip.after_update, run_tokenizer=clip.run_tokenizer,
                teacher=clip.teacher_params, update_teacher=clip.update_teacher)
