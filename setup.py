"""polytron: Megatron-style distributed pre-training in PyTorch."""
from setuptools import find_packages, setup

setup(
    name="polytron",
    version="0.1.0",
    description="Megatron-style distributed LLM pre-training (TP/SP/PP/FSDP/EP) with research architectures",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain*", "model*", "parallel*", "data*"]),
    install_requires=[
        # A range the local torch 2.13.0 CPU build satisfies (and torch 2.11 on GPU machines):
        # an already-installed torch is kept, so CPU machines never pull a CUDA build.
        "torch>=2.6,<2.14",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "wandb>=0.17",
        "megatron-core>=0.12,<0.17",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "zstandard>=0.19",  # .zst inputs of tools/preprocess_data.py
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.56", "accelerate>=1.0", "torchao>=0.18"],
        # Hugging Face tokenizer directories and checkpoint conversion
        # (transformers loads BitNet exports through its quantizer, which needs accelerate)
        "hf": ["transformers>=4.56", "accelerate>=1.0"],
        # FP8 training (precision.fp8): torchao's float8 (CPU-emulated tests and GPUs) ...
        "fp8": ["torchao>=0.18"],
        # ... or NVIDIA Transformer Engine (CUDA machines only)
        "te": ["transformer-engine[pytorch]>=2.0"],
    },
)
