"""The embedded default dataset "shapes": deterministic generator and TFDS builder.

Importing this package registers the TFDS builder ``shapes`` (configs ``64px``, ``32px``).
"""

from input_pipeline.shapes.builder import (
    DEFAULT_CONFIG,
    DEFAULT_SPLIT_SIZES,
    SPLITS,
    TOKENIZER_FILENAME,
    Shapes,
    dataset_dir,
    default_data_dir,
    prepare,
    tokenizer_path,
)
from input_pipeline.shapes.generator import (
    CLASS_NAMES,
    NUM_CLASSES,
    SPLIT_SEEDS,
    ZERO_SHOT_TEMPLATES,
    referring_expressions,
    render_example,
    scene_locations,
)
