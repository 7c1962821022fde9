"""Connects ``config.data`` to the grain pipelines of ``input_pipeline``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from ml_collections import ConfigDict

from input_pipeline import pipeline
from input_pipeline.shapes import builder as shapes_builder
from vlm_jax.config import ConfigError


@dataclasses.dataclass
class Data:
    """The prepared dataset of a run: train iterator, eval split and tokenizer."""

    config: ConfigDict
    data_dir: str
    tokenizer: Any

    def train_iterator(self):
        """This process's share of the training stream (checkpointable grain iterator)."""
        d = self.config.data
        return pipeline.create_train_iterator(
            data_dir=self.data_dir, dataset=d.name, config_name=d.config_name, split="train",
            global_batch_size=self.config.batch_size, seed=self.config.seed,
            context_length=self.config.model.text.context_length,
            process_index=jax.process_index(), process_count=jax.process_count(),
            worker_count=d.worker_count)

    def eval_split(self) -> dict:
        """The evaluation split, in memory (images, tokens, labels, class names, templates)."""
        e = self.config.eval
        d = self.config.data
        return pipeline.load_eval_split(
            data_dir=self.data_dir, dataset=d.name, config_name=d.config_name, split=e.split,
            context_length=self.config.model.text.context_length,
            max_examples=e.max_examples or None)

    def batch_shapes(self) -> dict[str, tuple]:
        """Global batch shapes of the training batches."""
        b = self.config.batch_size
        size = self.config.model.image.image_size
        return {"image": (b, size, size, 3), "text": (b, self.config.model.text.context_length)}


def prepare(config: ConfigDict) -> Data:
    """Builds the dataset if needed (process 0; others wait) and loads its tokenizer."""
    d = config.data
    if d.name != "shapes":
        raise ConfigError(f"config.data.name={d.name!r}: only the embedded 'shapes' dataset is "
                          "available in this version.")
    data_dir = d.data_dir or shapes_builder.default_data_dir()
    shapes_builder.prepare(data_dir, config=d.config_name, num_train=d.num_train or None,
                           process_index=jax.process_index())
    tokenizer = pipeline.tokenizer_for(data_dir=data_dir, dataset=d.name,
                                       config_name=d.config_name,
                                       context_length=config.model.text.context_length)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"config.model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size}); set it to at least that.")
    return Data(config, str(data_dir), tokenizer)
