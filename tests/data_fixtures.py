"""Shared tiny shapes dataset for the input-pipeline tests (built once per test session)."""

import pytest

from input_pipeline import shapes

TINY_NUM_TRAIN = 200
TINY_NUM_EVAL = 50


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """TFDS data_dir holding shapes/64px with 200 train and 50 examples per eval split.

    Test modules that import this fixture get separate fixture instances; ``prepare`` is
    idempotent, so the dataset is still built only once per session.
    """
    root = tmp_path_factory.getbasetemp() / "shapes_tiny"
    shapes.prepare(root, num_train=TINY_NUM_TRAIN, num_eval=TINY_NUM_EVAL, process_index=0,
                   progress=False)
    return str(root)
