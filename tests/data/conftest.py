"""Shared fixtures: a tiny real SentencePiece tokenizer and two small real datasets.

Text is the English prose shipped with Python (stdlib docstrings), so nothing is
downloaded and nothing is mocked.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass

import pytest

from polytron.data.builtin import iter_builtin_documents
from polytron.data.preprocess import preprocess
from polytron.data.tokenizer import train_sentencepiece

VOCAB = 512


@dataclass(frozen=True)
class Corpus:
    root: str
    tokenizer: str
    docs: tuple[str, ...]
    a: str       # dataset prefix from even documents
    b: str       # dataset prefix from odd documents


def write_jsonl(path: str, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    root = str(tmp_path_factory.mktemp("corpus"))
    docs = tuple(d for d in itertools.islice(iter_builtin_documents(), 160) if len(d) > 200)
    tok = train_sentencepiece(docs, os.path.join(root, "tok"), VOCAB, threads=2)
    a = write_jsonl(os.path.join(root, "a.jsonl"), docs[0::2])
    b = write_jsonl(os.path.join(root, "b.jsonl"), docs[1::2])
    preprocess([a], os.path.join(root, "a"), tok)
    preprocess([b], os.path.join(root, "b"), tok)
    return Corpus(root, tok, docs, os.path.join(root, "a"), os.path.join(root, "b"))
