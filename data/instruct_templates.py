"""Pre-training templates for instruction-augmented documents (Instruction Pre-Training).

A synthesized document becomes pre-training text as its raw text followed by its
instruction-response pairs in a natural template; several documents of one multi-round
chain (:func:`data.instruct.chains`) are concatenated into one few-shot text while it fits
the training sequence. The structure and the pair filter follow the released
``cook_pt_entries`` / ``read_compre_pt.py``; the template strings are our own, in pools of
the released order of magnitude (see docs/instruction_pretraining.md, "Paper, released code
and ours"):

* one **style** per chain, drawn from a ``random.Random`` seeded by (seed, first document
  id), so the output is a pure function of the records and the seed;
* **modes**: ``classic`` (text, an optional lead-in, an optional comprehension prompt, the
  pairs as Q/A exchanges; 5% of them inverted: pairs first, then the text), ``dialog`` (the
  pairs as a two-speaker conversation after the text) and, when every document of the chain
  has two or more pairs, ``numbered`` (numbered questions, then numbered answers);
* **pair kinds**, read from the synthesizer's own conventions: a question ending in
  ``\\nLet's think step by step.`` with an answer ``{reasoning}\\nTherefore, the answer is
  {answer}`` is a chain-of-thought task; a question holding ``\\nOptions:\\n- a\\n- b`` is a
  multiple-choice task whose options are shuffled and relabelled. Each kind (plain, options,
  chain of thought, both) has its own pattern pool, as in the released code; half of the
  option patterns leave the options out (the FLAN convention the released code follows).
* **the released filter** (:func:`task_of`): a pair that claims one of these forms but breaks
  it is dropped (and counted), and so is a multiple-choice pair whose answer is not one of
  its options, unless the answer says that none of them is right (it is then written as a
  "none of the options" answer).
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from polytron.data.instruct import Pair, Synthesized

COT_QUESTION = "\nLet's think step by step."
COT_ANSWER = "\nTherefore, the answer is "
OPTIONS = "\nOptions:\n- "
OPTION_ITEM = "\n- "

# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class QAPattern:
    """How one task is written (FLAN-style few-shot pattern). ``inputs`` and ``targets`` may
    name any field of the task: ``question``, ``answer``, ``cot`` (the reasoning),
    ``options`` (the listed options) and ``option_answer`` (the answer as an option label)."""
    inputs: str = "{question}"
    targets: str = "{answer}"
    inputs_prefix: str = ""
    targets_prefix: str = ""
    x_y_delimiter: str = "\n"
    example_separator: str = "\n\n"

    def render(self, fields: dict[str, str]) -> str:
        return (self.inputs_prefix + self.inputs.format(**fields) + self.x_y_delimiter
                + self.targets_prefix + self.targets.format(**fields))


def _mix(count: int, *pools: Sequence) -> list[tuple]:
    """``count`` combinations, the i-th taking element ``i mod len(pool)`` of each pool (pairwise
    coprime pool lengths make every combination distinct)."""
    return [tuple(pool[i % len(pool)] for pool in pools) for i in range(count)]


def _patterns(count: int, inputs: Sequence[str], targets: Sequence[str]) -> list[QAPattern]:
    combos = _mix(count, inputs, targets, LABELS, DELIMITERS)
    return [QAPattern(i, t, ip, tp, d, s) for i, t, (ip, tp), (d, s) in combos]


#: (inputs prefix, targets prefix)
LABELS = (
    ("Question: ", "Answer: "), ("Q: ", "A: "), ("", ""), ("Input: ", "Output: "),
    ("Problem: ", "Solution: "), ("QUESTION: ", "ANSWER: "), ("Query: ", "Response: "),
    ("question: ", "answer: "), ("[Q] ", "[A] "), ("Task: ", "Result: "), ("Exercise: ", "Answer: "),
    ("", "Answer: "), ("Ask: ", "Reply: "), ("Prompt: ", "Completion: "), ("Q. ", "A. "),
    ("Quiz: ", "Key: "), ("Instruction: ", "Response: "))
#: (between a question and its answer, between two tasks)
DELIMITERS = (("\n", "\n\n"), ("\n", "\n"), (" ", "\n"), ("\n\n", "\n\n\n"), ("\n---\n", "\n\n\n"),
              ("\n", "\n\n\n"), ("\n\n", "\n\n"))
QUESTION_FRAMES = (
    "{question}", "{question}\nWhat is the answer?", "Answer the following question.\n{question}",
    "Answer this: {question}", "Respond to the question below.\n{question}",
    "Here is a question about the text: {question}", "Please answer: {question}",
    "{question}\nWrite your answer.", "Think about the text and answer.\n{question}",
    "Question from the reading: {question}", "Can you answer this? {question}", "Try this one: {question}",
    "Quick question: {question}", "I have a question about the text. {question}",
    "{question}\n\nRespond below.", "Based on the passage: {question}", "Reply to this: {question}",
    "{question} (answer from the text)", "Here's a question. {question}")
#: Patterns that ask for the question given the answer.
REVERSED = (
    QAPattern("Write a question whose answer is:\n{answer}", "{question}", targets_prefix="Question: "),
    QAPattern("Here is an answer: {answer}\nWhat question does it answer?", "{question}", x_y_delimiter="\n\n"),
    QAPattern("Propose a question for the following answer. {answer}", "{question}", targets_prefix="Q: ",
              example_separator="\n\n\n"),
    QAPattern("{answer}", "{question}", "Answer: ", "Question: "),
    QAPattern("The answer is \"{answer}\". What was the question?", "{question}"),
    QAPattern("{answer}", "{question}", "Response: ", "Matching question: ", "\n---\n"),
    QAPattern("Turn this answer into a question: {answer}", "{question}", "Task: ", "Result: "),
    QAPattern("Given the reply \"{answer}\", write what was asked.", "{question}", example_separator="\n"),
)
OPTION_FRAMES = (
    "{question}\n{options}", "{question} {options}", "{question}\n\n{options}", "{options}\n{question}",
    "Choose the right option.\n{question}\n{options}", "{question}\nPick the correct choice.\n{options}",
    "Multiple choice: {question}\n{options}", "{question}\n{options}\nWhich is correct?",
    "Select the best answer.\n\n{question}\n{options}", "Question with choices: {question} {options}",
    "{question}\nConsider the options.\n{options}", "Here is a multiple-choice question. {question}\n{options}",
    "{question}\n\n{options}\n\nYour choice?")
OPTION_TARGETS = ("{option_answer}", "The correct option is {option_answer}", "Choice: {option_answer}")
COT_TARGETS = (
    "{cot}. So the answer is {answer}", "{cot}. Therefore: {answer}", "Reasoning: {cot}.\nAnswer: {answer}",
    "{cot}.\nThe final answer: {answer}", "Step by step: {cot}. Hence: {answer}",
    "Let me reason. {cot}. That gives {answer}", "{cot}. The answer: {answer}",
    "Explanation: {cot}.\nSo: {answer}", "Thinking it through: {cot}. Result: {answer}",
    "{cot}. Thus the answer is {answer}", "Rationale: {cot}\nFinal answer: {answer}", "{cot}. In short: {answer}",
    "The answer is {answer}. Explanation: {cot}.", "{answer}\nReason: {cot}.",
    "Chain of reasoning: {cot}.\nConclusion: {answer}", "{cot}.\nConclusion: {answer}",
    "Let's work it out. {cot}. Answer: {answer}", "{cot}; hence {answer}", "Working: {cot}.\nResult: {answer}",
    "Notes: {cot}.\nSo the answer is {answer}", "{cot}. [{answer}]", "{cot}. Final: {answer}",
    "My reasoning: {cot}. My answer: {answer}", "Solution: {cot}. The answer is {answer}",
    "{cot}.\n\nAnswer: {answer}", "Short answer: {answer}. Why: {cot}.", "Justification: {cot}.\nAnswer: {answer}",
    "{cot}.\nSo, {answer}", "Thought process: {cot}.\nOutcome: {answer}")
#: Chain-of-thought patterns that ask for the question given the reasoning.
REVERSED_COT = (
    QAPattern("{cot}", "Q: {question}\nA: {answer}", "Reasoning: ", "A question this reasoning answers:\n"),
    QAPattern("Thoughts: {cot}. The result was {answer}.", "{question}", targets_prefix="Question: "),
    QAPattern("Answer: {answer}\nExplanation: {cot}", "{question}", targets_prefix="What was asked: "),
    QAPattern("{cot}", "{question}\n{answer}", "Given this line of thought: ", "the question and answer were:\n"),
)


def _hide_options(p: QAPattern) -> QAPattern:
    """The pattern without its option list, answering with the answer's text."""
    inputs = re.sub(r"[ \n]*\{options\}[ \n]*", "\n", p.inputs).strip("\n")
    return dataclasses.replace(p, inputs=inputs, targets=p.targets.replace("{option_answer}", "{answer}"))


_SHOWN = _patterns(24, OPTION_FRAMES, OPTION_TARGETS)
#: One pool per task kind (the released ``qa`` / ``qa_w_option`` / ``qa_w_cot`` / ``qa_w_option_w_cot``).
PATTERNS: dict[str, tuple[QAPattern, ...]] = {
    "plain": tuple(_patterns(72, QUESTION_FRAMES, ("{answer}",))) + REVERSED,
    "options": tuple(_SHOWN + [_hide_options(p) for p in _SHOWN]),
    "cot": tuple(_patterns(206, QUESTION_FRAMES, COT_TARGETS)) + REVERSED_COT,
    "options+cot": tuple(_patterns(240, OPTION_FRAMES, [t.replace("{answer}", "{option_answer}")
                                                        for t in COT_TARGETS])),
}

# ----------------------------------------------------------------------------- options

OPTION_STARTS = ("", "Options:", "Choices:", "Pick one:", "Select from:", "Possible answers:",
                 "Choose from the following.", "Candidates:", "Answer choices:", "Which one?", "The options are:",
                 "Pick the best option:", "Alternatives:", "Available answers:", "Select one of these:",
                 "Your choices:")


def _roman(n: int) -> str:
    out = ""
    for value, digits in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
                          (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        count, n = divmod(n, value)
        out += digits * count
    return out


def _letter(i: int) -> str:
    return chr(65 + i) if i < 26 else str(i + 1)


#: The mark of option ``i``: letters, numbers, roman numerals.
MARKS: tuple[Callable[[int], str], ...] = (
    _letter, lambda i: _letter(i).lower(), lambda i: str(i + 1), lambda i: _roman(i + 1),
    lambda i: _roman(i + 1).lower())
BRACKETS = ("{}. ", "({}) ", "{}) ", "[{}] ", "({}). ")


@dataclass(frozen=True)
class OptionLabel:
    """How option ``i`` is introduced; ``nameable``: the label can stand for the answer
    (letters, numbers; bullets cannot, then the answer stays the option's text)."""
    lead: str
    mark: Optional[Callable[[int], str]]
    bracket: str
    nameable: bool

    def __call__(self, i: int) -> str:
        return self.lead + (self.bracket.format(self.mark(i)) if self.mark else self.bracket)


OPTION_LABELS = tuple(OptionLabel(lead, m, b, True) for lead in ("\n", " ") for m in MARKS for b in BRACKETS) + tuple(
    OptionLabel(lead, None, b, False) for lead, b in (("\n", " - "), ("\n", "* "), ("\n", "+ "), ("\n", "• "),
                                                     (" ", "- "), (" ", "* "), (" ", "+ "), ("\n", "-- ")))
OPTION_ENDS = ("", ";")

#: Answers that say none of the options is right (compared lower-cased, without a final
#: period); such a pair is kept and answered with one of :data:`NONE_OF_THEM`.
NONE_ANSWERS = frozenset((
    "none", "none of the above", "none of these", "none of them", "none of the options", "none of the choices",
    "none of the given options", "none of the above options", "none of the above choices", "none of the answers",
    "no option", "no correct option", "no correct answer", "no valid option", "no suitable option", "no answer",
    "not listed", "not among the options", "none apply", "none are correct", "none is correct", "nothing",
    "neither", "neither of them", "no right answer"))
NONE_OF_THEM = (
    "None of the above", "None of these", "None of the options", "No option is correct",
    "None of the listed answers", "Not among the choices", "No listed choice fits", "None of the given choices",
    "There is no correct option", "The right answer is not listed", "No choice applies", "Nothing listed is right",
    "None fit", "None of them", "No offered answer fits", "None of the choices is correct", "No option matches",
    "Not one of the options", "None of the offered answers", "All the options are wrong")


def is_none_answer(answer: str) -> bool:
    """Whether ``answer`` says that none of the options is right."""
    return answer.strip().lower().removesuffix(".").strip() in NONE_ANSWERS


# ----------------------------------------------------------------------------- texts

_LEADS = (
    "Read the passage below and answer the questions.\n{context}", "Article:\n{context}", "Passage: {context}",
    "Text: {context}", "Context: {context}", "Here is a document:\n{context}",
    "Study this text carefully:\n\n{context}",
    "Consider the following article.\n{context}", "Read this and answer questions afterwards: {context}",
    "Background: {context}", "Source text:\n{context}", "Below is an excerpt.\n\n{context}", "Document:\n{context}",
    "Read the following text.\n\n{context}", "Excerpt: {context}", "Reading material:\n{context}",
    "Go through this passage first.\n{context}", "The text below is followed by questions.\n{context}",
    "Please read:\n{context}", "Input text: {context}", "Here is an article for you to read.\n\n{context}",
    "Take a look at this passage:\n{context}", "Read carefully, questions follow.\n{context}",
    "An article:\n\n{context}", "From the corpus:\n{context}", "Reference text: {context}",
    "Use this passage for the questions below.\n{context}", "Material to read:\n\n{context}",
    "What follows is a text and some questions about it.\n{context}", "Write answers after reading this.\n{context}",
    "Given text:\n{context}", "Look at the following content. {context}", "Content: {context}",
    "Read and understand the passage.\n\n{context}", "This is the passage:\n{context}", "Extract:\n{context}",
    "Paragraphs:\n{context}", "Here is some text.\n{context}", "Begin reading.\n\n{context}",
    "The following is a piece of writing.\n{context}", "Review the text below.\n{context}",
    "Article text: {context}", "Your reading for today:\n{context}", "Read it through once: {context}",
    "Text to study:\n\n{context}", "A document to read before the questions:\n{context}",
    "Passage to analyse:\n{context}", "Piece:\n{context}")
#: Lead-ins before the text: half the draws none (the released proportion).
READ_STARTS = ("{context}",) * len(_LEADS) + _LEADS
READ_ENDS = (" ", "\n", "\n\n")
_PROMPTS = (
    "Answer the questions about the text above.", "Questions about the passage:", "Now answer these questions:",
    "Based on the article, respond to the following.", "Test your understanding:",
    "Reading comprehension questions:", "Use the text to answer:", "Here are some questions on the passage above.",
    "Answer based on the passage:", "Quiz:", "Questions and answers about the text:",
    "Respond to each question using the article.", "Check your reading:", "What did the text say? Answer below.",
    "Comprehension check:", "Questions:", "Answer the following based on what you read.",
    "Some questions about this text:", "Let's see how well you read it.", "Time for questions.",
    "Answer from the passage only.", "Questions on the article:", "Use the article to answer these.",
    "Exercises on the text:", "Here is a short quiz on the passage.", "Review questions:",
    "Answer with reference to the text.", "Show what you understood:", "Follow-up questions:",
    "Questions drawn from the document:", "Please answer using the information above.", "Reading check:",
    "Practice questions:", "Answer each of these after reading:", "Questions (answers follow each one):",
    "The text above answers these questions:", "Think about the passage and answer.",
    "Test questions on the reading:", "Questions about the content:", "Apply what you read:", "Self-check:",
    "Answer the prompts below.", "Discussion questions:", "Questions for the reader:",
    "The passage supports the following Q&A.", "Answer these from the document:", "Study questions:",
    "Here are some tasks based on the text.")
#: Comprehension prompts after the text: half the draws none (the released proportion).
COMPRE_STARTS = ("",) * len(_PROMPTS) + _PROMPTS

QA_STARTS = (
    "{qa}", "Here are some questions with answers; write the text they come from.\n{qa}", "Q&A:\n{qa}",
    "Study these questions and answers:\n\n{qa}", "Questions and answers first, then the passage.\n{qa}",
    "Consider these questions and answers.\n{qa}", "Answers to some questions:\n{qa}",
    "Given the following Q&A, write a matching passage.\n{qa}", "Here is a quiz with its answers.\n\n{qa}",
    "Q&A session:\n{qa}", "Read these questions and answers:\n{qa}",
    "The questions below were answered from a text.\n{qa}", "Questions with solutions:\n{qa}",
    "Preview of the questions:\n{qa}", "Before the text, some questions and their answers.\n{qa}",
    "{qa}\n\nThose were the questions.", "Quiz and key:\n{qa}", "Write a passage that answers all of these.\n{qa}",
    "Compose an article consistent with this Q&A:\n{qa}", "Question-answer pairs:\n{qa}",
    "Here is what a reader asked and learned.\n{qa}", "Answered questions:\n\n{qa}", "FAQ:\n{qa}",
    "Frequently asked questions:\n{qa}", "Facts as questions and answers:\n{qa}", "Key points in Q&A form:\n{qa}",
    "Notes (Q&A):\n{qa}", "Think of a text that fits these answers.\n{qa}",
    "Use these questions and answers to write a document.\n{qa}",
    "Given these answers, reconstruct the passage.\n\n{qa}", "Questions, answers, and then the source text.\n{qa}")
QA_ENDS = (" ", "\n", "\n\n", "\n\n\n")
TEXT_STARTS = (
    "{context}", "Passage: {context}", "Now write the passage they are about.\n{context}", "The text:\n{context}",
    "Source:\n\n{context}", "Article: {context}", "Here is the text.\n{context}",
    "The passage these come from:\n{context}", "Text:\n\n{context}", "Document: {context}",
    "The article:\n{context}", "And here is the passage.\n\n{context}", "Source text: {context}",
    "The original text follows.\n{context}", "Reference passage:\n{context}",
    "A passage that answers them:\n{context}", "Passage:\n{context}", "The corresponding text:\n{context}",
    "The answers come from this text:\n\n{context}", "Write the text.\n{context}", "Matching article:\n{context}",
    "Here it is:\n{context}", "Context:\n{context}", "Full text: {context}", "The document:\n\n{context}",
    "Article text:\n{context}", "Background reading:\n{context}", "The passage in full:\n{context}",
    "Text follows.\n{context}", "Underlying text: {context}", "Source document:\n{context}", "Read it here:\n{context}")

DIALOG_STARTS = ("", "Conversation:", "Dialogue:", "A conversation about the text:", "Two people discuss it:",
                 "Chat log:", "Transcript:", "Discussion:", "Here is a chat about the passage.", "They talked it over:",
                 "Exchange:", "Interview:", "A short Q&A session:", "Two readers compare notes:", "Talk:",
                 "What they said:")
_ROLES = (("Person A", "Person B"), ("Speaker 1", "Speaker 2"), ("User", "Assistant"), ("X", "Y"),
          ("Student", "Teacher"), ("Interviewer", "Expert"), ("Reader", "Writer"), ("Customer", "Agent"),
          ("Child", "Parent"), ("Learner", "Tutor"), ("Alice", "Bob"), ("Asker", "Answerer"), ("Visitor", "Guide"),
          ("Host", "Guest"), ("Friend 1", "Friend 2"), ("Journalist", "Specialist"), ("Trainee", "Mentor"),
          ("P1", "P2"), ("Human", "AI"), ("Newcomer", "Veteran"), ("Caller", "Operator"))
_TURNS = ("\n{}: ", "\n{} - ", "\n[{}] ", "\n{} says: ")
DIALOG_SPEAKERS = tuple((turn.format(a), turn.format(b)) for (a, b), turn in _mix(40, _ROLES, _TURNS)) + (
    ("\n- ", "\n- "), ("\n-- ", "\n-- "))

NUMBERED = (
    "{context}\n\nAnswer these questions:\n{questions}\n\nAnswers:\n{answers}",
    "Read the text and answer the numbered questions.\n{context}\n{questions}\nNumbered answers:\n{answers}",
    "{context}\nQuestions:\n{questions}\n\nAnswers:\n{answers}",
    "Questions:\n{questions}\n\nRead this text, then answer them: {context}\n\n{answers}",
    "{context}\n\n{questions}\nProvide the answers in order.\n{answers}",
    "{context}\n\nQuestions about the text:\n{questions}\n\nSolutions:\n{answers}",
    "Here is a passage and some questions.\n\n{context}\n\n{questions}\n\nAnswer key:\n{answers}",
    "{context}\nAnswer all of the following.\n{questions}\nResponses:\n{answers}",
    "First the questions:\n{questions}\nNow the text: {context}\nAnd the answers:\n{answers}",
    "{context}\n\nQuiz\n{questions}\n\nKey\n{answers}",
    "Text: {context}\nQuestions:\n{questions}\nAnswers:\n{answers}",
    "{context}\n\nTry these questions, then check the answers.\n{questions}\n\n{answers}")
#: (question label, answer label) with ``{n}`` the number, ``{r}`` / ``{R}`` its roman numeral.
NUMBER_LABELS = (("{n}. ", "{n}. "), ("({n}) ", "({n}) "), ("Q{n}: ", "A{n}: "), ("[{n}] ", "[{n}] "),
                 ("{n}) ", "{n}) "), ("#{n} ", "#{n} "), ("Question {n}: ", "Answer {n}: "), ("{n}: ", "{n}: "),
                 ("{r}. ", "{r}. "), ("({r}) ", "({r}) "), ("Q{n}. ", "A{n}. "), ("({n}). ", "({n}). "),
                 ("[Q{n}] ", "[A{n}] "), ("{n} - ", "{n} - "), ("Problem {n}: ", "Solution {n}: "),
                 ("{R}. ", "{R}. "))
NUMBER_JOINS = ("\n", "\n\n", " ")
#: Between the documents of one few-shot text.
FEWSHOT_SEPARATORS = ("\n\n", "\n\n\n")

# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A pair read as a task: plain, chain-of-thought and/or multiple choice.
    ``none_of_them``: a multiple-choice answer saying that no option is right."""
    question: str
    answer: str
    cot: Optional[str] = None
    options: Optional[tuple[str, ...]] = None
    none_of_them: bool = False

    @property
    def kind(self) -> str:
        """Its pattern pool: ``plain``, ``options``, ``cot`` or ``options+cot``."""
        base = "options" if self.options else "plain"
        return base if self.cot is None else ("cot" if base == "plain" else "options+cot")


def task_of(pair: Pair) -> Optional[Task]:
    """The task a pair states, or None where the released ``parse_QA_list`` drops it: a
    chain-of-thought or options form that is broken, or options without the answer among
    them (an answer saying none of them is right is kept). A whitespace-only question before
    the options is kept, as there."""
    q, a, cot = pair.question, pair.answer, None
    if COT_QUESTION in q or COT_ANSWER in a:
        parts = a.split(COT_ANSWER)
        if not q.endswith(COT_QUESTION) or len(parts) != 2:
            return None
        q = q[:-len(COT_QUESTION)].strip()
        cot, a = parts[0].strip().removesuffix("."), parts[1].strip()
        if not (q and cot and a):
            return None
    if OPTIONS not in q:
        return Task(q, a, cot)
    parts = q.split(OPTIONS)
    if len(parts) != 2 or not parts[0]:
        return None
    options = tuple(o.strip() for o in parts[1].split(OPTION_ITEM) if o.strip())
    if not options:
        return None
    if a.strip() in options:
        return Task(parts[0].strip(), a.strip(), cot, options)
    return Task(parts[0].strip(), a.strip(), cot, options, none_of_them=True) if is_none_answer(a) else None


# ----------------------------------------------------------------------------- styles


@dataclass
class Style:
    """Every template choice of one few-shot text (drawn once per chain)."""
    mode: str
    inverted: bool
    patterns: dict[str, QAPattern]
    option_start: str
    option_label: OptionLabel
    option_end: str
    none_of_them: str
    read_start: str
    read_end: str
    compre_start: str
    qa_start: str
    qa_end: str
    text_start: str
    dialog_start: str
    numbered: str
    number_labels: tuple[str, str]
    number_join: str
    separator: str
    rng: random.Random = field(repr=False)


def draw_style(rng: random.Random, min_pairs: int) -> Style:
    """Draw a style: modes weighted classic 95 / dialog 5, or with two or more pairs per
    document classic 80 / dialog 10 / numbered 10; 5% of classic and dialog texts inverted."""
    modes, weights = (("classic", "dialog", "numbered"), (80, 10, 10)) if min_pairs >= 2 \
        else (("classic", "dialog"), (95, 5))
    c = rng.choice
    patterns = {kind: c(pool) for kind, pool in PATTERNS.items()}
    mode = rng.choices(modes, weights)[0]
    if mode == "dialog":
        first, second = c(DIALOG_SPEAKERS)
        turn = dict(inputs_prefix=first, targets_prefix=second, x_y_delimiter=c(("", ".", ";")),
                    example_separator=c(("", "\n")))
        patterns = {kind: dataclasses.replace(p, **turn) for kind, p in patterns.items()}
    return Style(mode=mode, inverted=rng.random() < 0.05, patterns=patterns, option_start=c(OPTION_STARTS),
                 option_label=c(OPTION_LABELS), option_end=c(OPTION_ENDS), none_of_them=c(NONE_OF_THEM),
                 read_start=c(READ_STARTS), read_end=c(READ_ENDS), compre_start=c(COMPRE_STARTS),
                 qa_start=c(QA_STARTS), qa_end=c(QA_ENDS), text_start=c(TEXT_STARTS),
                 dialog_start=c(("\n\n", "\n", " ")) + c(DIALOG_STARTS), numbered=c(NUMBERED),
                 number_labels=c(NUMBER_LABELS), number_join=c(NUMBER_JOINS), separator=c(FEWSHOT_SEPARATORS),
                 rng=rng)


def _option_fields(task: Task, style: Style) -> dict[str, str]:
    """The shuffled, labelled options and the answer as a label (when it is one of the
    options and the labels can name it), as the option text, or as "none of them"."""
    options = list(task.options or ())
    style.rng.shuffle(options)
    label = style.option_label
    listed = "".join(label(i) + o + style.option_end for i, o in enumerate(options))
    match = [i for i, o in enumerate(options) if o == task.answer]
    if task.none_of_them:
        option_answer = style.none_of_them
    else:
        option_answer = label(match[0]).strip() if label.nameable else task.answer
    return {"options": (style.option_start + listed).strip(), "option_answer": option_answer}


def task_fields(task: Task, style: Style) -> dict[str, str]:
    """The values a pattern may name for ``task`` in ``style``."""
    fields = {"question": task.question, "answer": task.answer, "cot": task.cot or ""}
    return fields | _option_fields(task, style) if task.options else fields


def render_document(text: str, tasks: Sequence[Task], style: Style) -> str:
    """One document with its tasks in ``style`` (its raw text alone when it has none)."""
    if not tasks:
        return text
    rendered = [(style.patterns[t.kind], task_fields(t, style)) for t in tasks]
    if style.mode == "numbered":
        qn, an = style.number_labels

        def label(fmt: str, i: int) -> str:
            return fmt.format(n=i + 1, r=_roman(i + 1).lower(), R=_roman(i + 1))
        join = style.number_join
        questions = join.join(label(qn, i) + p.inputs.format(**f) for i, (p, f) in enumerate(rendered))
        answers = join.join(label(an, i) + p.targets.format(**f) for i, (p, f) in enumerate(rendered))
        return style.numbered.format(context=text, questions=questions, answers=answers)
    separator = style.patterns["plain"].example_separator
    demos = separator.join(p.render(f) for p, f in rendered)
    if style.inverted:
        return style.qa_start.format(qa=demos) + style.qa_end + style.text_start.format(context=text)
    if style.mode == "dialog":
        return text + style.dialog_start + separator + demos
    read_end = style.read_end if style.compre_start else ""
    return style.read_start.format(context=text) + read_end + style.compre_start + separator + demos
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


# ----------------------------------------------------------------------------- variety

#: One pair of each kind, with placeholder text (two identical options: the shuffle cannot
#: change the rendering, so only the template choices do).
PROBE_PAIRS = {
    "plain": Pair("QQ", "AA"),
    "options": Pair("QQ" + OPTIONS + "OPT" + OPTION_ITEM + "OPT", "OPT"),
    "cot": Pair("QQ" + COT_QUESTION, "RR" + COT_ANSWER + "AA"),
    "options+cot": Pair("QQ" + OPTIONS + "OPT" + OPTION_ITEM + "OPT" + COT_QUESTION, "RR" + COT_ANSWER + "OPT"),
}


def realized_variety(documents: int = 10000, seed: int = 0) -> dict[str, int]:
    """Distinct templates realized over ``documents`` one-document chains, each holding one
    pair of every kind (:data:`PROBE_PAIRS`): per kind, the distinct renderings of its pair
    (``pair/<kind>``, dialog turns included); the distinct pool patterns drawn per kind in
    classic and numbered texts (``pattern/<kind>``); the distinct whole documents (``documents``)."""
    pairs = list(PROBE_PAIRS.values())
    tasks = [t for t in (task_of(p) for p in pairs) if t is not None]
    seen: dict[str, set] = {}
    for i in range(documents):
        (text,) = format_chain([Synthesized(i, "TEXT", pairs)], seed, lambda t: True)
        seen.setdefault("documents", set()).add(text)
        style = draw_style(random.Random(f"{seed}:{i}"), len(pairs))
        for task in tasks:
            pattern = style.patterns[task.kind]
            if style.mode != "dialog":
                seen.setdefault(f"pattern/{task.kind}", set()).add(pattern)
            seen.setdefault(f"pair/{task.kind}", set()).add(pattern.render(task_fields(task, style)))
    return {k: len(v) for k, v in sorted(seen.items())}
