"""Instruction Pre-Training against the released algorithm: the synthesizer's prompt building,
the parsing of its generations and the pair filter of the pre-training templates, on a corpus
of edge cases, compared with reference functions written here from the released code's rules
(microsoft/LMOps ``instruction_pretrain``: ``cook_read`` / ``cook_compre``,
``parse_comprehension``, ``parse_QA_list`` / ``format_options``); and the template pools'
structure and realized variety."""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Optional

import pytest

from polytron.data.instruct import Pair, Synthesized, parse_pairs, render_prompt, synthesis_prompt
from polytron.data.instruct_templates import (
    COMPRE_STARTS,
    NONE_ANSWERS,
    NONE_OF_THEM,
    PATTERNS,
    READ_STARTS,
    FormatStats,
    draw_style,
    format_chain,
    realized_variety,
    task_fields,
    task_of,
)

# ----------------------------------------------------------------------------- reference

COT_Q, COT_A, OPTS = "\nLet's think step by step.", "\nTherefore, the answer is ", "\nOptions:\n- "


def ref_prompt(text: str, history: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """The released prompt string: each earlier text's context block, its pairs and ``</s>``,
    then the new text's block; an empty text is ``<s>`` alone."""
    def read(t: str) -> str:
        return "<s>" + f" <CON> {t} </CON>" + "\n\n" if len(t) > 0 else "<s>"

    def compre(pairs: list[tuple[str, str]]) -> str:
        return "\n\n".join(f"<QUE> {q} <ANS> {a} </END>" for q, a in pairs)
    return "".join(read(t) + compre(p) + "</s>" for t, p in history) + read(text)


def ref_parse(output: str) -> list[tuple[str, str]]:
    """The released parsing: split at ``</END>``, the last piece dropped unless the output ends
    with ``</END>``; a piece needs exactly one ``<ANS>``, a stripped question starting with
    ``<QUE>`` and a non-empty answer (an empty question passes); then questions are
    deduplicated case-insensitively, first kept."""
    pieces = output.split("</END>")
    if not output.endswith("</END>"):
        pieces = pieces[:-1]
    pairs = []
    for piece in pieces:
        parts = piece.split("<ANS>")
        if len(parts) != 2:
            continue
        q, a = parts[0].strip(), parts[1].strip()
        if not q.startswith("<QUE>") or len(a) == 0:
            continue
        pairs.append((q.replace("<QUE>", "").strip(), a))
    out, seen = [], []
    for q, a in pairs:
        if q.lower() not in seen:
            out.append((q, a))
            seen.append(q.lower())
    return out


def ref_task(q: str, a: str) -> Optional[tuple]:
    """The released per-pair filter: (question, answer, reasoning, options, none-of-them) or None
    where the pair is dropped. The none-of-them list is a parameter of the released algorithm;
    ours (``NONE_ANSWERS``, any case) is used here."""
    cot = None
    if COT_Q in q or COT_A in a:
        if not q.endswith(COT_Q):
            return None
        q = q[:-len(COT_Q)].strip()
        if len(q) == 0 or len(a.split(COT_A)) != 2:
            return None
        cot, a = (s.strip() for s in a.split(COT_A))
        if cot.endswith("."):
            cot = cot[:-1]
        if len(cot) == 0 or len(a) == 0:
            return None
    if OPTS not in q:
        return (q, a, cot, None, False)
    if len(q.split(OPTS)) != 2:
        return None
    question, listed = q.split(OPTS)
    if len(question) == 0:
        return None
    options = listed.split("\n- ")
    if a not in options and a.strip().lower().removesuffix(".").strip() in NONE_ANSWERS:
        return (question, a, cot, options, True)
    if not any(a.strip() == o.strip() for o in options):
        return None
    return (question, a, cot, options, False)


# ----------------------------------------------------------------------------- corpus

PROMPTS = [
    ("Cats purr.", []),
    ("", []),
    (" ", []),                                           # whitespace text: a context block (len > 0)
    ("Raw <s> and </s> and <QUE> inside.", []),
    ("Line one.\n\nLine two.", [("First text.", [("q1?", "a1"), ("q2?", "a2")])]),
    ("Third.", [("First.", [("q?", "a")]), ("Second.", [("Why?\nLet's think step by step.",
                                                          "Because.\nTherefore, the answer is x")])]),
    ("Now.", [("Opt.", [("Pick\nOptions:\n- x\n- y", "x")])]),
]

GENERATIONS = [
    "",
    "<QUE> q <ANS> a </END>",
    "<QUE> q <ANS> a </END>\n\n",
    "\n\n<QUE> q <ANS> a </END>\n\n<QUE> q2 <ANS> a2",                   # unfinished last pair
    "<QUE> q <ANS> a </END> trailing words",
    "<QUE>  <ANS> a </END>",                                               # empty question
    "<QUE> \t \n <ANS> a </END>\n\n<QUE> real <ANS> b </END>",              # whitespace-only question
    "<QUE>  <ANS> a </END><QUE>  <ANS> b </END>",                           # two empty questions
    "<QUE> q <ANS>   </END>",                                              # empty answer
    "<QUE> q <ANS> a <ANS> b </END>",                                      # two answer markers
    "<QUE> q a </END>",                                                    # no answer marker
    "q <ANS> a </END>",                                                    # no question marker
    "junk <QUE> q <ANS> a </END>",
    "<QUE> a <QUE> b <ANS> c </END>",                                      # inner question marker removed
    "<QUE> q <ANS> a </END></END>",                                        # empty piece
    "<QUE> Same? <ANS> a </END>\n\n<QUE> same? <ANS> b </END>\n\n<QUE> SAME? <ANS> c </END>",
    "<QUE> How many?\nOptions:\n- 3\n- 4 <ANS> 4 </END>\n\n<QUE> Which?\nOptions:\n- x\n- y <ANS> z </END>",
    "<QUE> \nOptions:\n- x\n- y <ANS> x </END>",                           # stripped: no option marker left
    "<QUE> Why?\nLet's think step by step. <ANS> Because it is.\nTherefore, the answer is blue </END>",
    "<QUE> Is it?\nOptions:\n- yes\n- no\nLet's think step by step. <ANS> It is not.\nTherefore, the answer "
    "is maybe </END>\n\n<QUE> Which one?\nOptions:\n- a\n- b <ANS> None of the above </END>",
]

#: Pairs as they reach the templates (records may come from elsewhere: unstripped pairs too).
PAIRS = [
    Pair("Plain?", "Yes."),
    Pair("How many?\nOptions:\n- 3\n- 4", "4"),
    Pair("How many?\nOptions:\n- 3\n- 4", "5"),                                 # answer not among options
    Pair("How many?\nOptions:\n- 3 \n- 4", " 3"),                               # matched after stripping
    Pair("How many?\nOptions:\n- 3\n- 4", "4."),                                # not the option's text
    Pair("Pick\nOptions:\n- x\n- y", "None of the above"),                      # none of them: kept
    Pair("Pick\nOptions:\n- x\n- y", "none."),
    Pair("Pick\nOptions:\n- x\n- none", "none"),                                # an option after all
    Pair(" \nOptions:\n- x\n- y", "x"),                                         # whitespace question: kept
    Pair(" \nOptions:\n- x\n- y", "z"),
    Pair("\nOptions:\n- x\n- y", "x"),                                          # empty question: dropped
    Pair("A\nOptions:\n- x\nOptions:\n- y", "x"),                               # two option lists
    Pair("Why?\nLet's think step by step.", "Because.\nTherefore, the answer is blue"),
    Pair("Why?\nLet's think step by step.", "Because."),                        # no conclusion
    Pair("Why?", "Because.\nTherefore, the answer is blue"),                     # no step-by-step cue
    Pair("Why?\nLet's think step by step.", ".\nTherefore, the answer is blue"),  # empty reasoning
    Pair("Why?\nLet's think step by step.", "R.\nTherefore, the answer is "),   # empty answer
    Pair("Why?\nLet's think step by step.", "R\nTherefore, the answer is a\nTherefore, the answer is b"),
    Pair("\nLet's think step by step.", "R\nTherefore, the answer is a"),       # empty question
    Pair("Is it?\nOptions:\n- yes\n- no\nLet's think step by step.", "It is.\nTherefore, the answer is yes"),
    Pair("Is it?\nOptions:\n- yes\n- no\nLet's think step by step.", "It is.\nTherefore, the answer is maybe"),
    Pair("Is it?\nOptions:\n- yes\n- no\nLet's think step by step.", "Unclear.\nTherefore, the answer is none"),
    Pair(" \nOptions:\n- yes\n- no\nLet's think step by step.", "R\nTherefore, the answer is yes"),
    Pair("Q\nOptions:\n- yes\n- \n- no", "no"),                                 # an empty option item
]


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("text,history", PROMPTS)
def test_prompt_matches_the_released_string(text, history) -> None:
    ours = synthesis_prompt(text, [(t, [Pair(q, a) for q, a in p]) for t, p in history])
    assert render_prompt(ours) == ref_prompt(text, history)


@pytest.mark.parametrize("output", GENERATIONS)
def test_parsing_matches_the_released_rules(output) -> None:
    ours = parse_pairs(output)
    ref = ref_parse(output)
    # the one documented departure: a pair with an empty question is dropped as malformed
    assert [(p.question, p.answer) for p in ours.pairs] == [(q, a) for q, a in ref if q]
    complete = len(output.split("</END>")) - 1
    assert len(ours.pairs) + ours.malformed + ours.duplicates == complete + ours.unfinished


def _same(task, ref) -> bool:
    """Our task equals the reference's, options compared without surrounding blanks and empty
    items (ours lists neither)."""
    if task is None or ref is None:
        return task is None and ref is None
    question, answer, cot, options, none = ref
    cleaned = None if options is None else tuple(o.strip() for o in options if o.strip())
    return (task.question, task.answer, task.cot, task.options, task.none_of_them) == \
        (question.strip(), answer.strip(), cot, cleaned, none)


@pytest.mark.parametrize("pair", PAIRS, ids=range(len(PAIRS)))
def test_pair_filter_matches_the_released_rules(pair) -> None:
    assert _same(task_of(pair), ref_task(pair.question, pair.answer))


def test_filter_on_the_corpus() -> None:
    kept = [task_of(p) is not None for p in PAIRS]
    assert kept == [True, True, False, True, False, True, True, True, True, False, False, False,
                    True, False, False, False, False, False, False, True, False, True, True, True]
    # documented departure: options that are all empty are dropped (released: kept for a none answer)
    assert task_of(Pair("Pick\nOptions:\n- ", "None")) is None and ref_task("Pick\nOptions:\n- ", "None")
    # generations end to end: parse, then filter, both as released
    for output in GENERATIONS:
        ours = [task_of(p) for p in parse_pairs(output).pairs]
        ref = [ref_task(q, a) for q, a in ref_parse(output) if q]
        assert len(ours) == len(ref) and all(_same(t, r) for t, r in zip(ours, ref))


def test_option_answers_name_the_right_option() -> None:
    task = task_of(Pair("Which?\nOptions:\n- red\n- green\n- blue\n- gold", "blue"))
    none = task_of(Pair("Which?\nOptions:\n- red\n- green", "None of the above."))
    assert task is not None and none is not None and none.none_of_them
    named = 0
    for seed in range(300):
        style = draw_style(random.Random(seed), 1)
        fields = task_fields(task, style)
        listed = fields["options"]
        assert all(o in listed for o in ("red", "green", "blue", "gold"))
        if style.option_label.nameable:                          # the label in front of "blue"
            named += 1
            assert re.search(r"(?<![\w(\[])" + re.escape(fields["option_answer"]) + r" blue\b", listed)
        else:
            assert fields["option_answer"] == "blue"
        assert task_fields(none, style)["option_answer"] in NONE_OF_THEM
    assert 200 < named < 300


def test_dropped_pairs_never_reach_the_text() -> None:
    doc = Synthesized(0, "Body.", [Pair("Kept?\nOptions:\n- 3\n- 4", "4"),
                                   Pair("Wrong?\nOptions:\n- 3\n- 4", "5"),
                                   Pair("Wrong too?\nOptions:\n- x\n- y\nLet's think step by step.",
                                        "R.\nTherefore, the answer is z")])
    for seed in range(20):
        stats = FormatStats()
        (text,) = format_chain([doc], seed, lambda t: True, stats)
        assert (stats.pairs, stats.dropped_pairs) == (1, 2)
        assert "Kept?" in text and "Wrong" not in text


def test_pools_keep_the_released_structure() -> None:
    assert {k: len(v) for k, v in PATTERNS.items()} == {"plain": 80, "options": 48, "cot": 210, "options+cot": 240}
    assert all(len(set(pool)) == len(pool) for pool in PATTERNS.values())
    hidden = [p for p in PATTERNS["options"] if "{options}" not in p.inputs]
    assert len(hidden) == 24 and all("{option_answer}" not in p.targets for p in hidden)
    assert all("{options}" in p.inputs for p in PATTERNS["options+cot"])
    assert all("{cot}" in p.inputs + p.targets for k in ("cot", "options+cot") for p in PATTERNS[k])
    assert READ_STARTS.count("{context}") * 2 == len(READ_STARTS)              # half the texts bare
    assert COMPRE_STARTS.count("") * 2 == len(COMPRE_STARTS)                   # half without a prompt
    rng = random.Random(5)
    for min_pairs, weights in ((1, {"classic": 95, "dialog": 5}), (2, {"classic": 80, "dialog": 10, "numbered": 10})):
        styles = [draw_style(rng, min_pairs) for _ in range(4000)]
        modes = Counter(s.mode for s in styles)
        assert all(abs(modes[m] / 4000 - w / 100) < 0.02 for m, w in weights.items()) and set(modes) == set(weights)
        assert abs(sum(s.inverted for s in styles) / 4000 - 0.05) < 0.015


def test_realized_variety_and_no_synthesizer_markers() -> None:
    variety = realized_variety(1200, seed=3)
    for kind, pool in PATTERNS.items():                         # nearly every pattern realized
        assert variety[f"pattern/{kind}"] >= 0.95 * len(pool), kind
    assert variety["documents"] == 1200 and variety["pair/plain"] > 150 and variety["pair/options+cot"] > 1100
    assert realized_variety(300, seed=3) == realized_variety(300, seed=3)
    pairs = [Pair("Q1?\nOptions:\n- a1\n- b1", "a1"), Pair("Q2?\nLet's think step by step.",
                                                          "R2.\nTherefore, the answer is A2"), Pair("Q3?", "A3")]
    for i in range(500):
        (text,) = format_chain([Synthesized(i, "T.", pairs)], 0, lambda t: True)
        assert "Let's think step by step" not in text and "Therefore, the answer is" not in text
        assert "\nOptions:\n- " not in text and all(s in text for s in ("Q1?", "Q2?", "R2", "A2", "Q3?", "A3"))
