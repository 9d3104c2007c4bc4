"""Quiet import of megatron-core's data stack (its package import warns about TE/apex)."""
from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
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
