"""Training data: tokenizers, Megatron indexed datasets, blending and resumable loaders.

The trainer's entry point is :func:`build_data`; see ``docs/data.md`` for the design
(file format, global sample order, resumability, blending).

The names below load on first use (PEP 562), so importing a light module of this
package (``data.errors``, ``data.preprocess``) does not import torch or megatron-core.
"""
from __future__ import annotations

import importlib

from polytron.data.errors import DataError

#: public name -> the module that defines it
_LAZY = {"DataBundle": "polytron.data.loader", "TrainLoader": "polytron.data.loader",
         "build_data": "polytron.data.loader", "collate": "polytron.data.loader",
         "HFTokenizer": "polytron.data.tokenizer",
         "SentencePieceTokenizer": "polytron.data.tokenizer", "load_tokenizer": "polytron.data.tokenizer"}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
