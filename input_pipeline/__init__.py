"""Input pipeline of vlm_jax: datasets, tokenizers, transforms and grain loaders."""


class DataError(ValueError):
    """A dataset, tokenizer or input-pipeline setting is missing or invalid.

    The message names the offending path or setting and says how to fix it.
    """
