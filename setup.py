"""saejax: sparse autoencoders on language-model activations, in JAX, sharded over a mesh."""

from setuptools import find_packages, setup

setup(
    name="saejax",
    version="0.1.0",
    description="Sparse autoencoders on LM activations at scale, in JAX/Flax (TPU, GPU, CPU).",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["saejax", "saejax.*"]),
    # The dashboard's Jinja2 templates (pages, partials, their inline style and script).
    package_data={"saejax.analysis": ["templates/*.html", "templates/*.css", "templates/*.js",
                                      "templates/partials/*.html"]},
    install_requires=[
        "jax>=0.8",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "tensorstore>=0.1.70",
        "absl-py>=2.0",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "scipy>=1.11",        # the scaling fits (saejax/fits.py)
        "safetensors>=0.4",   # Hugging Face format checkpoints (saejax/models)
        "tokenizers>=0.15",   # the checkpoint's own tokenizer.json
        "jinja2>=3.1",        # the dashboard's HTML templates (saejax/analysis/templates)
        "gguf>=0.17",         # GGUF checkpoints: reader and dequantiser (saejax.models.convert)
        "tensorboardX>=2.6",  # TensorBoard event files of every run, no TensorFlow (tracking.py)
    ],
    extras_require={
        # torch (CPU build, pinned) and transformers only for the parity tests against the
        # reference models (accelerate for transformers' own GGUF loading; 5.x reads the
        # rope_parameters that converted configs hold); never a runtime dependency.
        # tensorboard: its event reader checks the event files runs write (tests/test_tracking.py).
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "transformers>=5.0",
                 "accelerate>=1.0", "tensorboard>=2.14"],
        # Workdirs and activation stores in gs:// buckets (etils.epath's GCS backend).
        "gcs": ["gcsfs"],
        # Weights & Biases logging, when a config sets logging.wandb_project (tracking.py).
        "wandb": ["wandb"],
    },
)
