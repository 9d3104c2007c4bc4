"""Pre-training templates for instruction-augmented documents (Instruction Pre-Training).

A synthesized document becomes pre-training text as its raw text followed by its
instruction-response pairs in a natural template; several documents of one multi-round
chain (:func:`data.instruct.chains`) are concatenated into one few-shot text while it fits
the training sequence. The structure follows the released ``cook_pt_entries`` /
``read_compre_pt.py``; the template strings are our own and fewer (see
docs/instruction_pretraining.md, "Departures"):

* one **style** per chain, drawn from a ``random.Random`` seeded by (seed, first document
  id), so the output is a pure function of the records and the seed;
* **modes**: ``classic`` (text, an optional lead-in, the pairs as Q/A exchanges; 5% of
  them inverted: pairs first, then the text), ``dialog`` (the pairs as a two-speaker
  conversation after the text) and, when every document of the chain has two or more
  pairs, ``numbered`` (numbered questions, then numbered answers);
* **pair kinds**, read from the synthesizer's own conventions: a question ending in
  ``\\nLet's think step by step.`` with an answer ``{reasoning}\\nTherefore, the answer is
  {answer}`` is a chain-of-thought task; a question holding ``\\nOptions:\\n- a\\n- b`` is a
  multiple-choice task whose options are re-lettered and shuffled. A pair that claims one
  of these forms but breaks it is dropped (and counted), as the released code does.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from polytron.data.instruct import Pair, Synthesized

COT_QUESTION = "\nLet's think step by step."
COT_ANSWER = "\nTherefore, the answer is "
OPTIONS = "\nOptions:\n- "

# ----------------------------------------------------------------------------- strings


@dataclass(frozen=True)
class QAPattern:
    """How one question and its answer are written (FLAN-style few-shot pattern)."""
    inputs: str = "{question}"
    targets: str = "{answer}"
    inputs_prefix: str = ""
    targets_prefix: str = ""
    x_y_delimiter: str = "\n"
    example_separator: str = "\n\n"

    def render(self, question: str, answer: str) -> str:
        return (self.inputs_prefix + self.inputs.format(question=question) + self.x_y_delimiter
                + self.targets_prefix + self.targets.format(answer=answer))


QA_PATTERNS = (
    QAPattern(inputs_prefix="Question: ", targets_prefix="Answer: "),
    QAPattern(inputs_prefix="Q: ", targets_prefix="A: "),
    QAPattern(inputs_prefix="Q: ", targets_prefix="A: ", x_y_delimiter=" ", example_separator="\n"),
    QAPattern(inputs_prefix="Input: ", targets_prefix="Output: "),
    QAPattern(inputs_prefix="Problem: ", targets_prefix="Solution: ", example_separator="\n\n\n"),
    QAPattern(inputs="Answer the following: {question}"),
    QAPattern(targets_prefix="Answer: ", x_y_delimiter="\n\n", example_separator="\n\n\n"),
    QAPattern(inputs_prefix="QUESTION: ", targets_prefix="ANSWER: "),
    QAPattern(inputs_prefix="Query: ", targets_prefix="Response: "),
    QAPattern(inputs="{question}\nWhat is the answer?"),
    QAPattern(inputs_prefix="question: ", targets_prefix="answer: ", example_separator="\n"),
    QAPattern(inputs="Reply to this: {question}", targets_prefix="Reply: "),
    QAPattern(inputs_prefix="[Q] ", targets_prefix="[A] "),
    QAPattern(),
    QAPattern(inputs_prefix="Exercise: ", targets_prefix="Answer: ", x_y_delimiter="\n---\n",
              example_separator="\n\n\n"),
    QAPattern(inputs_prefix="Task: ", targets_prefix="Result: "),
)

#: How a chain-of-thought answer is written.
COT_TARGETS = ("{cot}. So the answer is {answer}", "{cot}. Therefore: {answer}",
               "Reasoning: {cot}.\nAnswer: {answer}", "{cot}.\nThe final answer: {answer}",
               "Step by step: {cot}. Hence: {answer}")

OPTION_STARTS = ("", "Options:", "Choices:", "Pick one:", "Select from:", "Possible answers:",
                 "Choose from the following.")
#: Option labels: a function of the option's index, and whether the label can stand for the
#: answer (letters and numbers can; bullets cannot, then the answer stays the option text).
OPTION_LABELS: tuple[tuple[Callable[[int], str], bool], ...] = (
    (lambda i: f"\n({chr(65 + i)}) ", True), (lambda i: f"\n{chr(65 + i)}. ", True),
    (lambda i: f"\n({chr(97 + i)}) ", True), (lambda i: f"\n{i + 1}) ", True),
    (lambda i: f" [{chr(65 + i)}] ", True), (lambda i: "\n- ", False), (lambda i: "\n* ", False),
)

READ_STARTS = ("{context}",) * 12 + (
    "Read the passage below and answer the questions.\n{context}", "Article:\n{context}",
    "Passage: {context}", "Text: {context}", "Context: {context}", "Here is a document:\n{context}",
    "Study this text carefully:\n\n{context}", "Consider the following article.\n{context}",
    "Read this and answer questions afterwards: {context}", "Background: {context}",
    "Source text:\n{context}", "Below is an excerpt.\n\n{context}")
READ_ENDS = (" ", "\n", "\n\n")
COMPRE_STARTS = ("",) * 12 + (
    "Answer the questions about the text above.", "Questions about the passage:",
    "Now answer these questions:", "Based on the article, respond to the following.",
    "Test your understanding:", "Reading comprehension questions:", "Use the text to answer:",
    "Here are some questions on the passage above.", "Answer based on the passage:", "Quiz:",
    "Questions and answers about the text:", "Respond to each question using the article.")

QA_STARTS = ("{qa}", "Here are some questions with answers; write the text they come from.\n{qa}",
             "Q&A:\n{qa}", "Study these questions and answers:\n\n{qa}",
             "Questions and answers first, then the passage.\n{qa}")
QA_ENDS = (" ", "\n", "\n\n", "\n\n\n")
TEXT_STARTS = ("{context}", "Passage: {context}", "Now write the passage they are about.\n{context}",
               "The text:\n{context}", "Source:\n\n{context}")

DIALOG_STARTS = ("", "Conversation:", "Dialogue:", "A conversation about the text:",
                 "Two people discuss it:", "Chat log:")
DIALOG_SPEAKERS = (("\nPerson A: ", "\nPerson B: "), ("\nSpeaker 1: ", "\nSpeaker 2: "),
                   ("\nUser: ", "\nAssistant: "), ("\n- ", "\n- "), ("\nX: ", "\nY: "),
                   ("\nStudent: ", "\nTeacher: "))

NUMBERED = ("{context}\n\nAnswer these questions:\n{questions}\n\nAnswers:\n{answers}",
            "Read the text and answer the numbered questions.\n{context}\n{questions}\n"
            "Numbered answers:\n{answers}",
            "{context}\nQuestions:\n{questions}\n\nAnswers:\n{answers}",
            "Questions:\n{questions}\n\nRead this text, then answer them: {context}\n\n{answers}",
            "{context}\n\n{questions}\nProvide the answers in order.\n{answers}")
NUMBER_LABELS = (("{n}. ", "{n}. "), ("({n}) ", "({n}) "), ("Q{n}: ", "A{n}: "), ("[{n}] ", "[{n}] "))
#: Between the documents of one few-shot text.
FEWSHOT_SEPARATORS = ("\n\n", "\n\n\n")

# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A pair read as a task: plain, chain-of-thought and/or multiple choice."""
    question: str
    answer: str
    cot: Optional[str] = None
    options: Optional[tuple[str, ...]] = None


def task_of(pair: Pair) -> Optional[Task]:
    """The task a pair states, or None when it claims a chain-of-thought or options form
    but breaks it (the released ``parse_QA_list`` drops those)."""
    q, a, cot = pair.question, pair.answer, None
    if COT_QUESTION in q or COT_ANSWER in a:
        parts = a.split(COT_ANSWER)
        if not q.endswith(COT_QUESTION) or len(parts) != 2:
            return None
        q = q[:-len(COT_QUESTION)].strip()
        cot, a = parts[0].strip().removesuffix("."), parts[1].strip()
        if not (q and cot and a):
            return None
    options = None
    if OPTIONS in q:
        parts = q.split(OPTIONS)
        if len(parts) != 2 or not parts[0].strip():
            return None
        q, options = parts[0].strip(), tuple(o.strip() for o in parts[1].split("\n- ") if o.strip())
        if not options:
            return None
    return Task(q, a, cot, options)


# ----------------------------------------------------------------------------- styles


@dataclass
class Style:
    """Every template choice of one few-shot text (drawn once per chain)."""
    mode: str
    inverted: bool
    qa: QAPattern
    cot_target: str
    option_start: str
    option_label: tuple[Callable[[int], str], bool]
    read_start: str
    read_end: str
    compre_start: str
    qa_start: str
    qa_end: str
    text_start: str
    dialog_start: str
    numbered: str
    number_labels: tuple[str, str]
    separator: str
    rng: random.Random = field(repr=False)


def draw_style(rng: random.Random, min_pairs: int) -> Style:
    """Draw a style: modes weighted classic 95 / dialog 5, or with two or more pairs per
    document classic 80 / dialog 10 / numbered 10; 5% of classic and dialog texts inverted."""
    modes, weights = (("classic", "dialog", "numbered"), (80, 10, 10)) if min_pairs >= 2 \
        else (("classic", "dialog"), (95, 5))
    c = rng.choice
    qa = c(QA_PATTERNS)
    mode = rng.choices(modes, weights)[0]
    if mode == "dialog":
        first, second = c(DIALOG_SPEAKERS)
        qa = QAPattern(inputs_prefix=first, targets_prefix=second, x_y_delimiter=c(("", ".", ";")),
                       example_separator=c(("", "\n")))
    return Style(mode=mode, inverted=rng.random() < 0.05, qa=qa, cot_target=c(COT_TARGETS),
                 option_start=c(OPTION_STARTS), option_label=c(OPTION_LABELS), read_start=c(READ_STARTS),
                 read_end=c(READ_ENDS), compre_start=c(COMPRE_STARTS), qa_start=c(QA_STARTS),
                 qa_end=c(QA_ENDS), text_start=c(TEXT_STARTS),
                 dialog_start=c(("\n\n", "\n", " ")) + c(DIALOG_STARTS), numbered=c(NUMBERED),
                 number_labels=c(NUMBER_LABELS), separator=c(FEWSHOT_SEPARATORS), rng=rng)


def _options_text(task: Task, style: Style) -> tuple[str, str]:
    """(question with its lettered, shuffled options; the answer, as a label when it is one
    of the options and the labels can name it)."""
    options = list(task.options or ())
    style.rng.shuffle(options)
    label, nameable = style.option_label
    listed = "".join(label(i) + o for i, o in enumerate(options))
    question = task.question + ("\n" + style.option_start if style.option_start else "") + listed
    match = [i for i, o in enumerate(options) if o == task.answer.strip()]
    answer = label(match[0]).strip() if match and nameable else task.answer
    return question, answer


def render_task(task: Task, style: Style) -> tuple[str, str]:
    """(question text, answer text) of a task in ``style``."""
    question, answer = _options_text(task, style) if task.options else (task.question, task.answer)
    if task.cot is not None:
        answer = style.cot_target.format(cot=task.cot, answer=answer)
    return question, answer


def render_document(text: str, tasks: Sequence[Task], style: Style) -> str:
    """One document with its tasks in ``style`` (its raw text alone when it has none)."""
    if not tasks:
        return text
    rendered = [render_task(t, style) for t in tasks]
    if style.mode == "numbered":
        qn, an = style.number_labels
        questions = "\n".join(qn.format(n=i + 1) + q for i, (q, _) in enumerate(rendered))
        answers = "\n".join(an.format(n=i + 1) + a for i, (_, a) in enumerate(rendered))
        return style.numbered.format(context=text, questions=questions, answers=answers)
    demos = style.qa.example_separator.join(style.qa.render(q, a) for q, a in rendered)
    if style.inverted:
        return style.qa_start.format(qa=demos) + style.qa_end + style.text_start.format(context=text)
    if style.mode == "dialog":
        return text + style.dialog_start + style.qa.example_separator + demos
    read_end = style.read_end if style.compre_start else ""
    return (style.read_start.format(context=text) + read_end + style.compre_start
            + style.qa.example_separator + demos)


# ----------------------------------------------------------------------------- chains


@dataclass
class FormatStats:
    """What formatting produced and dropped."""
    documents: int = 0
    texts: int = 0
    pairs: int = 0
    dropped_pairs: int = 0


def format_chain(chain: Sequence[Synthesized], seed: int, fits: Callable[[str], bool],
                 stats: Optional[FormatStats] = None) -> list[str]:
    """Pre-training texts of one chain: its documents in one style, concatenated in order
    while ``fits`` accepts the text (a document that does not fit even alone is its own
    text). Deterministic in (records, seed)."""
    stats = stats if stats is not None else FormatStats()
    rng = random.Random(f"{seed}:{chain[0].id}")
    tasks = []
    for doc in chain:
        kept = [t for t in (task_of(p) for p in doc.pairs) if t is not None]
        stats.pairs += len(kept)
        stats.dropped_pairs += len(doc.pairs) - len(kept)
        tasks.append(kept)
    style = draw_style(rng, min((len(t) for t in tasks), default=0))
    parts = [render_document(doc.text, t, style) for doc, t in zip(chain, tasks)]
    texts = pack(parts, style.separator, fits)
    stats.documents += len(chain)
    stats.texts += len(texts)
    return texts


def pack(parts: Sequence[str], separator: str, fits: Callable[[str], bool]) -> list[str]:
    """Join consecutive ``parts`` with ``separator`` while ``fits`` accepts the result."""
    out: list[str] = []
    current: list[str] = []
    for part in parts:
        if current and not fits(separator.join(current + [part])):
            out.append(separator.join(current))
            current = []
        current.append(part)
    if current:
        out.append(separator.join(current))
    return out
