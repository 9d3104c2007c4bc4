"""megatron-core's data stack, imported without its model stack.

``import megatron.core.datasets...`` normally runs ``megatron/core/__init__.py`` first,
which imports tensor-parallel layers, transformer configs and fused kernels (about 3 s
on a 2-core machine, and warnings about TE/apex) that the data code never touches.
:func:`_data_only_package` registers ``megatron.core`` as a bare package so only the
dataset modules and what they import load; if that ever fails (another megatron-core
layout), the modules are dropped and the package is imported the normal way.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings


def _data_only_package() -> None:
    """Register ``megatron.core`` without running its ``__init__`` (unless already imported)."""
    if "megatron.core" in sys.modules:
        return
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType("megatron.core")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__, pkg.__file__ = spec, spec.origin
    sys.modules["megatron.core"] = pkg
    importlib.import_module("megatron.core.parallel_state")  # breaks utils <-> parallel_state the way __init__ does


def _import() -> None:
    from megatron.core.datasets import blended_dataset, gpt_dataset, indexed_dataset  # noqa: F401


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        _data_only_package()
        _import()
    except Exception:  # fall back to the full package import
        for name in [m for m in sys.modules if m == "megatron.core" or m.startswith("megatron.core.")]:
            del sys.modules[name]
        _import()
    from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: F401
    from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: F401
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.blended_megatron_dataset_config import (  # noqa: F401
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: F401
    from megatron.core.datasets.indexed_dataset import (  # noqa: F401
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
    )
    from megatron.core.datasets.utils import Split  # noqa: F401
