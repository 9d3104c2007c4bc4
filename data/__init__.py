"""Training data: tokenizers, Megatron indexed datasets, blending and resumable loaders.

The trainer's entry point is :func:`build_data`; see ``docs/data.md`` for the design
(file format, global sample order, resumability, blending).
"""
from data.errors import DataError
from data.loader import DataBundle, TrainLoader, build_data, collate
from data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

__all__ = ["DataError", "DataBundle", "TrainLoader", "build_data", "collate", "load_tokenizer",
           "SentencePieceTokenizer", "HFTokenizer"]
