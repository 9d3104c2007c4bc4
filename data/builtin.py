"""The embedded default corpus: English prose that ships with Python itself.

Documents are (1) the docstrings of each standard-library module (module, class and
function docstrings of one ``.py`` file joined by blank lines; read with ``ast``,
nothing is imported; test packages skipped) and (2) every ``pydoc_data.topics`` entry.
About 2.3 MB of text. On first use it is turned into a SentencePiece BPE tokenizer and
a Megatron indexed dataset under ``cache_dir``; later calls reuse them.

Concurrency: ranks (or separate jobs) may call :func:`ensure_builtin_corpus` at the
same time. An exclusive ``fcntl`` lock serializes builders; the build happens in a
private temporary directory that is atomically renamed into place, so a reader sees
either nothing or a complete corpus.
"""
from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Iterator

from polytron.data.errors import DataError

log = logging.getLogger(__name__)

#: Bump when the corpus text, tokenizer settings or file layout change.
FORMAT_VERSION = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class BuiltinCorpus:
    """Paths of a built corpus."""
    directory: str
    prefix: str       # Megatron dataset prefix (PREFIX.bin / PREFIX.idx)
    tokenizer: str    # SentencePiece .model


def _docstrings(path: str) -> str:
    """All docstrings of one source file, joined by blank lines ('' if none/unparsable)."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            parts.append(doc)
        kids = [n for n in ast.iter_child_nodes(node)
                if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack.extend(reversed(kids))
    return "\n\n".join(parts)


def iter_builtin_documents() -> Iterator[str]:
    """Yield the corpus documents in a fixed order (stdlib files sorted, then topics)."""
    root = sysconfig.get_paths()["stdlib"]
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                text = _docstrings(os.path.join(d, name))
                if text.strip():
                    yield text
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if topics[key].strip():
            yield topics[key]


def cache_key(vocab_size: int) -> str:
    """Directory name: format version, Python version and vocabulary size."""
    return f"builtin-v{FORMAT_VERSION}-py{sys.version_info[0]}{sys.version_info[1]}-vocab{vocab_size}"


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing), released on exit."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _complete(directory: str) -> BuiltinCorpus | None:
    done = os.path.join(directory, "DONE")
    if not os.path.isfile(done):
        return None
    return BuiltinCorpus(directory, os.path.join(directory, "corpus"),
                         os.path.join(directory, "tokenizer.model"))


def ensure_builtin_corpus(cache_dir: str, vocab_size: int = 4096) -> BuiltinCorpus:
    """Return the cached built-in corpus, building it first if needed (rank/job safe)."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    final = os.path.join(cache_dir, cache_key(vocab_size))
    found = _complete(final)
    if found:
        return found
    try:
        with file_lock(final + ".lock"):
            found = _complete(final)  # another process may have finished while we waited
            if found:
                return found
            _build(final, vocab_size)
    except OSError as e:
        raise DataError(f"built-in corpus cache {cache_dir}: cannot write ({e.strerror}); "
                        f"set data.cache_dir to a writable directory") from None
    found = _complete(final)
    assert found is not None
    return found


def _relocate_summary(final: str) -> None:
    """Point the summary at the final (renamed) paths instead of the temp build dir."""
    path = os.path.join(final, "corpus.summary.json")
    with open(path, encoding="utf-8") as f:
        summ = json.load(f)
    summ["output_prefix"] = os.path.join(final, "corpus")
    summ["tokenizer"] = os.path.join(final, "tokenizer.model")
    summ["input_files"] = ["<builtin: stdlib docstrings + pydoc_data.topics>"]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summ, f, indent=1)
    os.replace(path + ".tmp", path)


def _build(final: str, vocab_size: int) -> None:
    """Build corpus text -> tokenizer -> indexed dataset in a temp dir, then rename."""
    from polytron.data.preprocess import preprocess
    from polytron.data.tokenizer import train_sentencepiece

    t0 = time.time()
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        docs = list(iter_builtin_documents())
        jsonl = os.path.join(tmp, "corpus.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        train_sentencepiece(docs, os.path.join(tmp, "tokenizer"), vocab_size, model_type="bpe")
        summ = preprocess([jsonl], os.path.join(tmp, "corpus"), os.path.join(tmp, "tokenizer.model"),
                          workers=1, strict=True)
        os.remove(jsonl)
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write(f"{summ.documents} documents, {summ.tokens} tokens\n")
        if os.path.exists(final):  # an incomplete leftover (no DONE) from a killed build
            shutil.rmtree(final)
        os.rename(tmp, final)
        _relocate_summary(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built-in corpus built in %.1f s: %s (%d documents, %d tokens)",
             time.time() - t0, final, summ.documents, summ.tokens)
