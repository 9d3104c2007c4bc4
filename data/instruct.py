"""Instruction Pre-Training (Cheng et al. 2024): the synthesizer's prompt and output format.

The released instruction synthesizer (a 7B model fine-tuned to read a text and write
instruction-response pairs about it) is prompted with the raw text between context
markers and answers with pairs, each a question marker, the question, an answer marker,
the answer and an end marker, pairs separated by blank lines::

    <s> <CON> {text} </CON>\\n\\n                                      <- prompt
    <QUE> {q1} <ANS> {a1} </END>\\n\\n<QUE> {q2} <ANS> {a2} </END></s>   <- generation

Multi-round synthesis prepends earlier documents with their pairs (each closed by the
end-of-sequence token), oldest first, so later rounds see few-shot examples::

    <s> <CON> {t1} </CON>\\n\\n<QUE> ... </END></s><s> <CON> {t2} </CON>\\n\\n

A prompt is a list of text parts and :data:`BOS` / :data:`EOS` placeholders, so a raw
text that happens to contain ``<s>`` is never read as a special token; the tokenizer
side (``encode_prompt``) turns the placeholders into ids.

:func:`parse_pairs` reads a generation back into pairs with the released rules (split at
end markers, an unfinished last pair dropped, exactly one answer marker per pair, a
question marker first, a non-empty answer, questions deduplicated case-insensitively)
and counts what it drops; it also drops an empty question, which the released parser
keeps (docs/instruction_pretraining.md, "Paper, released code and ours"). The
pre-training templates live in :mod:`data.instruct_templates`; this module also links
synthesized documents into the chains that multi-round synthesis produced (:func:`chains`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

from polytron.data.tokenizer import SYNTHESIZER_MARKERS

CON, CON_END, QUE, ANS, END = SYNTHESIZER_MARKERS
#: Between the context block and the pairs, and between two pairs.
DELIMITER = "\n\n"


@dataclass(frozen=True)
class Pair:
    """One synthesized instruction-response pair."""
    question: str
    answer: str


@dataclass(frozen=True)
class Special:
    """A special-token placeholder inside a prompt (``bos`` or ``eos``)."""
    name: str


BOS = Special("bos")
EOS = Special("eos")
PromptPart = Union[str, Special]


# ----------------------------------------------------------------------------- prompts

def context_block(text: str) -> list[PromptPart]:
    """``<s> <CON> {text} </CON>\\n\\n`` (the leading space is the released format's)."""
    return [BOS, f" {CON} {text} {CON_END}{DELIMITER}"] if text else [BOS]


def pairs_block(pairs: Sequence[Pair]) -> str:
    """``<QUE> {q} <ANS> {a} </END>`` per pair, joined by blank lines."""
    return DELIMITER.join(f"{QUE} {p.question} {ANS} {p.answer} {END}" for p in pairs)


def synthesis_prompt(text: str, history: Sequence[tuple[str, Sequence[Pair]]] = ()) -> list[PromptPart]:
    """The synthesizer's prompt for ``text``, after ``history`` (earlier texts with their
    pairs, oldest first)."""
    parts: list[PromptPart] = []
    for ctx, pairs in history:
        parts += context_block(ctx) + [pairs_block(pairs), EOS]
    return parts + context_block(text)


def render_prompt(prompt: Sequence[PromptPart], bos: str = "<s>", eos: str = "</s>") -> str:
    """The prompt as one string, placeholders written as ``bos`` / ``eos`` (the released
    code builds exactly this string and lets the tokenizer parse the special tokens)."""
    written = {BOS: bos, EOS: eos}
    return "".join(written[p] if isinstance(p, Special) else p for p in prompt)


def encode_prompt(prompt: Sequence[PromptPart], encode: Callable[[str], list[int]],
                  bos_id: Optional[int], eos_id: Optional[int]) -> list[int]:
    """Token ids: text parts through ``encode``, placeholders as ``bos_id`` / ``eos_id``
    (left out when the tokenizer has none)."""
    ids: list[int] = []
    for p in prompt:
        if isinstance(p, Special):
            tid = bos_id if p == BOS else eos_id
            ids += [] if tid is None else [tid]
        else:
            ids += encode(p)
    return ids


# ----------------------------------------------------------------------------- parsing

@dataclass
class Parsed:
    """Pairs read from one generation and what was dropped."""
    pairs: list[Pair] = field(default_factory=list)
    malformed: int = 0        # complete pieces that break the format
    duplicates: int = 0       # questions seen before (case-insensitive)
    unfinished: bool = False  # the generation stopped inside a pair (also counted as malformed)


def _pair_of(piece: str) -> Optional[Pair]:
    """The pair of one ``<QUE> q <ANS> a`` piece, or None when it breaks the format."""
    parts = piece.split(ANS)
    if len(parts) != 2:
        return None
    q, a = parts[0].strip(), parts[1].strip()
    if not q.startswith(QUE) or not a:
        return None
    q = q.replace(QUE, "").strip()
    return Pair(q, a) if q else None


def parse_pairs(output: str) -> Parsed:
    """Instruction-response pairs of a synthesizer generation (see the module docstring)."""
    pieces = output.split(END)
    tail = pieces.pop()                       # after the last end marker: unfinished, or empty
    out = Parsed(unfinished=bool(tail.strip()))
    out.malformed += int(out.unfinished)
    seen: set[str] = set()
    for piece in pieces:
        pair = _pair_of(piece)
        if pair is None:
            out.malformed += 1
        elif pair.question.lower() in seen:
            out.duplicates += 1
        else:
            seen.add(pair.question.lower())
            out.pairs.append(pair)
    return out


# ----------------------------------------------------------------------------- records

@dataclass
class Synthesized:
    """One document after synthesis (a record of ``tools/synthesize_instructions.py``).

    ``prev`` is the id of the document whose text and pairs came right before this one's
    in its prompt (multi-round synthesis), else None.
    """
    id: int
    text: str
    pairs: list[Pair]
    prev: Optional[int] = None

    @property
    def inherits(self) -> bool:
        """Continues its predecessor's few-shot text: it was prompted after it and has pairs
        (the released code's ``inherit_from_prev``)."""
        return self.prev is not None and bool(self.pairs)


def record_of(obj: dict) -> Synthesized:
    """A :class:`Synthesized` from a JSON record (``id``, ``text``, ``pairs``, ``prev``)."""
    pairs = [Pair(str(p["question"]), str(p["answer"])) for p in obj.get("pairs") or ()]
    prev = obj.get("prev")
    return Synthesized(int(obj["id"]), str(obj["text"]), pairs, None if prev is None else int(prev))


def record_json(doc: Synthesized) -> dict:
    """The JSON-safe record of a document (inverse of :func:`record_of`)."""
    return {"id": doc.id, "text": doc.text, "prev": doc.prev,
            "pairs": [{"question": p.question, "answer": p.answer} for p in doc.pairs]}


def chains(docs: Iterable[Synthesized]) -> list[list[Synthesized]]:
    """Split documents into the few-shot chains multi-round synthesis made: a document
    that inherits from its predecessor continues that predecessor's chain. Chains are
    ordered by their first document, each oldest first; a document whose predecessor is
    absent starts a chain."""
    by_tail: dict[int, list[Synthesized]] = {}
    out: list[list[Synthesized]] = []
    for doc in sorted(docs, key=lambda d: d.id):
        chain = by_tail.pop(doc.prev, None) if doc.inherits and doc.prev is not None else None
        if chain is None:
            chain = []
            out.append(chain)
        chain.append(doc)
        by_tail[doc.id] = chain
    return out


def history_of(records: dict[int, Synthesized], prev: Optional[int]) -> list[Synthesized]:
    """The earlier documents a prompt may show before a new one, nearest first: ``prev``
    if it has pairs, then each document its chain inherited from."""
    out: list[Synthesized] = []
    doc = records.get(prev) if prev is not None else None
    if doc is None or not doc.pairs:
        return out
    out.append(doc)
    while doc.inherits and doc.prev in records:
        doc = records[doc.prev]
        out.append(doc)
    return out
