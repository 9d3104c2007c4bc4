"""Tokenizers: SentencePiece models and Hugging Face tokenizer directories.

Both are wrapped behind one small interface (``vocab_size``, ``eod_id``, ``encode``,
``decode``, ``path``) that also satisfies what megatron-core's ``GPTDataset`` reads from
its tokenizer (``vocab_size``, ``eod``, ``unique_identifiers``). The end-of-document
token is the tokenizer's end-of-sequence token.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Iterable, Iterator, Protocol, Sequence, cast

from polytron.data.errors import DataError
from polytron.data.files import ensure_writable_dir, missing_dirs, remove_empty_dirs, writing

#: The instruction synthesizer's markers (Instruction Pre-Training, data/instruct.py): the
#: context's start and end, a question, its answer, the end of a pair.
SYNTHESIZER_MARKERS: tuple[str, ...] = ("<CON>", "</CON>", "<QUE>", "<ANS>", "</END>")
#: Markers used to format instruction-augmented documents (Instruction Pre-Training).
#: ``tools/train_tokenizer.py --instruction-markers`` adds them as user-defined symbols
#: so each marker is exactly one token.
INSTRUCTION_MARKERS: tuple[str, ...] = ("<INST>", "</INST>", "<RESP>", "</RESP>") + SYNTHESIZER_MARKERS


class _MegatronAttrs:
    """Attributes megatron-core's GPTDataset reads from a tokenizer."""
    path: str
    vocab_size: int
    eod_id: int

    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "path": self.path, "vocab_size": self.vocab_size,
                "fingerprint": self.fingerprint}

    @property
    def fingerprint(self) -> str:
        """What the tokenizer *is*, not where it lies: ``sha256:<16 hex>`` over its content
        (see :func:`fingerprint_of`). Computed once."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = _fingerprint(self._content(), self.vocab_size, self._special_ids())
        return self._fingerprint

    def _content(self) -> bytes:
        """The bytes that define the tokenizer (hashed into :attr:`fingerprint`)."""
        raise NotImplementedError

    def _special_ids(self) -> dict[str, int | None]:
        """The special token ids (bos, eos, unk, pad; None where undefined)."""
        raise NotImplementedError


class SentencePieceTokenizer(_MegatronAttrs):
    """A SentencePiece ``.model`` file; end-of-document is its ``</s>`` (eos) piece."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        self.path = os.path.abspath(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer {self.path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size: int = int(self._sp.get_piece_size())
        self.eod_id: int = int(self._sp.eos_id())
        if self.eod_id < 0:
            raise DataError(f"tokenizer {self.path}: has no end-of-sequence piece to mark document ends")

    def _content(self) -> bytes:
        """The serialized model (pieces, scores, normalizer and trainer settings)."""
        return self._sp.serialized_model_proto()

    def _special_ids(self) -> dict[str, int | None]:
        sp = self._sp
        return {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts, encoded on the calling thread only."""
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a token id sequence."""
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(_MegatronAttrs):
    """A Hugging Face tokenizer directory (``tokenizer.json`` etc.), loaded offline."""

    def __init__(self, path: str) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        self.path = os.path.abspath(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True,
                                                     trust_remote_code=False)
        except Exception as e:  # transformers raises many types for unreadable dirs
            raise DataError(f"tokenizer {self.path}: not a loadable Hugging Face tokenizer "
                            f"directory ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.vocab_size: int = int(len(self._tok))
        eos = self._tok.eos_token_id
        if eos is None:
            raise DataError(f"tokenizer {self.path}: defines no eos_token to mark document ends")
        self.eod_id: int = int(eos)

    def _content(self) -> bytes:
        """The fast tokenizer's pipeline (model with vocabulary and merges, normalizer,
        pre-tokenizer, added tokens) as canonical JSON, else the sorted vocabulary."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            return json.dumps(json.loads(backend.to_str()), sort_keys=True).encode()
        return json.dumps(sorted(self._tok.get_vocab().items())).encode()

    def _special_ids(self) -> dict[str, int | None]:
        t = self._tok
        return {"bos": t.bos_token_id, "eos": t.eos_token_id, "unk": t.unk_token_id, "pad": t.pad_token_id}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts."""
        if not texts:
            return []
        return [list(x) for x in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a token id sequence."""
        return cast(str, self._tok.decode([int(i) for i in ids]))  # a str for one sequence


Tokenizer = SentencePieceTokenizer | HFTokenizer


def _fingerprint(content: bytes, vocab_size: int, special_ids: dict) -> str:
    """``sha256:<16 hex>`` of a tokenizer's content, vocabulary size and special ids."""
    h = hashlib.sha256(content)
    h.update(json.dumps({"vocab_size": vocab_size, **special_ids}, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()[:16]


def fingerprint_of(path: str) -> str:
    """The fingerprint of the tokenizer at ``path`` (a SentencePiece ``.model`` or a Hugging
    Face tokenizer directory): equal for two copies of one tokenizer wherever they lie,
    different for two tokenizers of the same vocabulary size."""
    return load_tokenizer(path).fingerprint


def check_same_tokenizer(expected: str | None, actual: str, what_expected: str, what_actual: str) -> None:
    """Refuse (DataError) when two recorded fingerprints differ; ``expected`` None (older
    files that recorded none) passes."""
    if expected and actual and expected != actual:
        raise DataError(f"tokenizer mismatch: {what_expected} was tokenized with {expected}, "
                        f"{what_actual} is {actual}")


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece ``.model`` file or a Hugging Face tokenizer directory."""
    if not path:
        raise DataError("no tokenizer given: set data.tokenizer (a SentencePiece .model file or a "
                        "Hugging Face tokenizer directory) or data.builtin_corpus=true")
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return HFTokenizer(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    raise DataError(f"tokenizer {os.path.abspath(path)}: no such file or directory")


class _Progress(Protocol):
    """A progress bar counting bytes (tqdm's ``update``)."""

    def update(self, n: int, /) -> object: ...


def _lines_of(docs: Iterable[str], progress: _Progress | None) -> Iterator[str]:
    """Feed SentencePiece one non-empty line at a time (it trains on sentences)."""
    for doc in docs:
        if progress is not None:
            progress.update(len(doc.encode("utf-8", "replace")))
        for line in doc.split("\n"):
            line = line.rstrip("\r")
            if line.strip():
                yield line


def train_sentencepiece(docs: Iterable[str], output_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", special_tokens: Sequence[str] = (),
                        total_bytes: int | None = None, show_progress: bool = False,
                        max_sentences: int = 4_000_000, threads: int | None = None) -> str:
    """Train a byte-fallback SentencePiece model on ``docs``; return the ``.model`` path.

    Text is kept verbatim (identity normalization, whitespace preserved); characters the
    vocabulary lacks fall back to byte pieces, so any UTF-8 text round-trips. Ids:
    ``<unk>``=0, ``<s>``=1, ``</s>``=2 (the end-of-document token), then
    ``special_tokens`` as user-defined symbols (each always one token).
    Both files are trained under a temporary name and renamed into place, so a failed
    run leaves neither behind; an unwritable output location fails before training.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model type {model_type!r}: allowed: bpe, unigram")
    output_prefix = os.path.abspath(os.path.expanduser(output_prefix))
    created = missing_dirs(os.path.dirname(output_prefix))
    ensure_writable_dir(os.path.dirname(output_prefix), f"tokenizer output {output_prefix}")
    staged = f"{output_prefix}.tmp{os.getpid()}"
    try:
        _train(docs, staged, output_prefix + ".model", vocab_size, model_type, special_tokens,
               total_bytes, show_progress, max_sentences, threads)
        with writing(f"tokenizer output {output_prefix}"):
            for ext in (".vocab", ".model"):  # the .model last: it is what readers look for
                os.replace(staged + ext, output_prefix + ext)
    except BaseException:
        for ext in (".vocab", ".model"):
            with contextlib.suppress(OSError):
                os.remove(staged + ext)
        remove_empty_dirs(created)
        raise
    return output_prefix + ".model"


def _train(docs: Iterable[str], output_prefix: str, name: str, vocab_size: int, model_type: str,
           special_tokens: Sequence[str], total_bytes: int | None, show_progress: bool,
           max_sentences: int, threads: int | None) -> None:
    """Run the SentencePiece trainer, writing ``output_prefix.model`` / ``.vocab``.

    ``name`` is the final model path, used in messages.
    """
    import sentencepiece as spm

    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading text",
                        file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines_of(docs, progress), model_prefix=output_prefix,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=list(special_tokens), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            max_sentence_length=1 << 14, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=threads or os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"sentencepiece training for {name} failed: "
                        f"{str(e).strip().splitlines()[-1]}") from None
    finally:
        if progress is not None:
            progress.close()
    if show_progress:
        print(f"trained {model_type} tokenizer, vocab {vocab_size}, in {time.time() - t0:.1f} s: {name}",
              file=sys.stderr)
