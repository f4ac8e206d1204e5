"""ift_jax: instruction fine-tuning of T5-family models in JAX."""

import setuptools

# Ranges are the ones checked to install and work together (see README).
INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "numpy>=1.26,<3",
    "ml_dtypes>=0.5",
    "safetensors>=0.4,<0.9",
    # Training: optimizers, checkpoints, configs, metric writers, LoRA/QLoRA.
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "ml-collections>=1.1,<1.2",
    "clu>=0.0.12,<0.1",
    "tensorboard>=2.20,<3",
    "qwix>=0.1.8,<0.2",
    # Data: SeqIO tasks and mixtures (TensorFlow is imported only under
    # ift_jax/data and tasks/), templates, metrics.
    "seqio>=0.0.20,<0.0.21",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9,<4.10",
    "sentencepiece>=0.2,<0.3",
    "jinja2>=3.1,<4",
    "rouge-score>=0.1.2,<0.2",
    "sacrebleu>=2.4,<3",
    # GLUE/SuperGLUE leaderboard metrics (MCC, F1, macro F1; scipy comes with it).
    "scikit-learn>=1.5,<2",
    # rougeLsum's sentence splitting: rule-based, no model download (nltk's punkt needs one).
    "pysbd>=0.3.4,<0.4",
    # Reports: plots of a run's metrics (`ift-jax report`).
    "matplotlib>=3.9,<3.11",
    # Progress bars with an ETA on a terminal (ift_jax.progress); plain lines in logs.
    "tqdm>=4.66,<5",
    # t5x checkpoints in (ift_jax.t5x_checkpoint): the msgpack index and zarr arrays.
    # Both already come with flax / orbax; named because ift_jax imports them itself.
    "msgpack>=1.0,<2",
    "tensorstore>=0.1.60,<0.2",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8,<10",
        # Two test processes (`make test`): most tests wait on one XLA compile at a time.
        "pytest-xdist>=3.6,<4",
        # Executing notebooks/ (tests/test_notebook.py).
        "nbclient>=0.10,<0.12",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
        # The calibration library HELM computes its ECE with: the reference in
        # tests/test_leaderboard_metrics.py.
        "uncertainty-calibration>=0.1.4,<0.2",
    ],
    # Parity tests against the reference and importing `.bin` checkpoints.
    # torch is pinned exactly: a looser range pulls a multi-GB CUDA build.
    "hf": [
        "torch==2.13.0",
        "transformers>=5,<6",
        "peft>=0.21,<0.22",
        "safetensors>=0.4,<0.9",
    ],
    "gpu": ["jax[cuda13]>=0.10,<0.11"],
    "tpu": ["jax[tpu]>=0.10,<0.11"],
}

setuptools.setup(
    name="ift-jax",
    version="0.1.0",
    description="Instruction fine-tuning of T5-family models in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # tasks/ and configs/ (docs/design.md's layout) install as ift_jax.tasks and
    # ift_jax.configs, so the embedded default config works from any directory;
    # studies/ (docs/studies/) as ift_jax.studies.
    packages=setuptools.find_packages(include=["ift_jax", "ift_jax.*"])
    + ["ift_jax.tasks", "ift_jax.configs", "ift_jax.configs.sweeps", "ift_jax.studies"],
    package_dir={"ift_jax.tasks": "tasks", "ift_jax.configs": "configs",
                 "ift_jax.configs.sweeps": "configs/sweeps", "ift_jax.studies": "studies"},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["ift-jax=ift_jax.cli:main"]},
    license="Apache-2.0",
)
