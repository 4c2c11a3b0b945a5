import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

setup(
    name="mcd_scale",
    version="0.1.0",
    description="Distributed training of masked diffusion LMs and Masked Consistency Distillation students",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["mcd_scale", "mcd_scale.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4", "deepspeed>=0.16", "megatron-core>=0.12", "webdataset>=0.2.90",
        "sentencepiece", "tensorboard", "numpy", "pyyaml", "tqdm", "matplotlib", "safetensors", "scipy",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        # NVIDIA apex is built from source on GPU clusters (see docs/install.md); the PyPI package
        # named 'apex' is an unrelated project and must never be installed.
        "test": ["pytest"],
        # tools/evaluate.py --hf-model / --smollm2 (pinned in requirements.txt, so CI tests this path).
        "hf-eval": ["transformers", "gguf", "accelerate"],
    },
)
