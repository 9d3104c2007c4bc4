"""polytron: Megatron-style distributed pre-training in PyTorch."""
from setuptools import find_packages, setup

#: The repository's top-level folders, installed as subpackages of ``polytron`` (import
#: ``polytron.model``, ``polytron.data``, ...): nothing named ``model`` or ``data`` lands at
#: the top level of site-packages. ``polytron`` itself is a namespace package.
FOLDERS = ("model", "parallel", "data", "pretrain", "launch", "tools")


def polytron_packages() -> dict[str, str]:
    """``{"polytron.model.moe": "model/moe", ...}`` for every package under FOLDERS."""
    found = {}
    for folder in FOLDERS:
        for name in [folder] + [f"{folder}.{sub}" for sub in find_packages(folder)]:
            found[f"polytron.{name}"] = name.replace(".", "/")
    return found


setup(
    name="polytron",
    version="0.1.0",
    description="Megatron-style distributed LLM pre-training (TP/SP/PP/FSDP/EP) with research architectures",
    python_requires=">=3.10",
    packages=list(polytron_packages()),
    package_dir=polytron_packages(),
    package_data={"polytron.launch": ["configs/*.yaml", "slurm/*.in"]},
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
        "pyarrow>=14",  # Parquet, Arrow and datasets-directory inputs of tools/preprocess_data.py
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.56", "accelerate>=1.0", "torchao>=0.18",
                "lm-eval>=0.4.9",
                # lint and types (tests/test_lint.py; configured in ruff.toml and mypy.ini)
                "ruff>=0.17,<0.18", "mypy>=2.4,<2.5"],
        # Hugging Face tokenizer directories and checkpoint conversion
        # (transformers loads BitNet exports through its quantizer, which needs accelerate)
        "hf": ["transformers>=4.56", "accelerate>=1.0"],
        # FP8 training (precision.fp8): torchao's float8 (CPU-emulated tests and GPUs) ...
        "fp8": ["torchao>=0.18"],
        # ... or NVIDIA Transformer Engine (CUDA machines only)
        "te": ["transformer-engine[pytorch]>=2.0"],
        # downstream evaluation: tools/evaluate.py and in-loop evaluation.tasks (docs/evaluation.md)
        "eval": ["lm-eval>=0.4.9"],
    },
)
