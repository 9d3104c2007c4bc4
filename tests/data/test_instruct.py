"""Instruction Pre-Training formatting: the synthesizer's prompt and output format, parsing of
real-format generations, the pre-training templates and multi-round chains."""
from __future__ import annotations

import itertools
import random

import pytest

from polytron.data.builtin import iter_builtin_documents
from polytron.data.instruct import (
    BOS,
    EOS,
    Pair,
    Synthesized,
    chains,
    encode_prompt,
    history_of,
    pairs_block,
    parse_pairs,
    record_json,
    record_of,
    render_prompt,
    synthesis_prompt,
)
from polytron.data.instruct_templates import FormatStats, format_chain, pack, task_of
from polytron.data.tokenizer import INSTRUCTION_MARKERS, SYNTHESIZER_MARKERS, load_tokenizer, train_sentencepiece

#: A generation in the released synthesizer's format (pairs of the kinds it was fine-tuned on:
#: free-form, multiple choice, chain of thought, both), then the end-of-sequence cut.
REAL_OUTPUT = (
    "<QUE> What is the main idea of the passage? <ANS> Exclusive breastfeeding of twins depends mostly "
    "on the mother's self-efficacy. </END>\n\n"
    "<QUE> How many mothers took part in the study?\nOptions:\n- 184\n- 6\n- 23\n- 95 <ANS> 184 </END>\n\n"
    "<QUE> Which factor influenced success the most?\nLet's think step by step. "
    "<ANS> The regression shows breastfeeding self-efficacy with OR 0.111, the strongest effect."
    "\nTherefore, the answer is breastfeeding self-efficacy </END>\n\n"
    "<QUE> Is the study cross-sectional?\nOptions:\n- yes\n- no\nLet's think step by step. <ANS> The text "
    "says it was a cross-sectional study.\nTherefore, the answer is yes </END>")
REAL_PAIRS = [
    Pair("What is the main idea of the passage?",
         "Exclusive breastfeeding of twins depends mostly on the mother's self-efficacy."),
    Pair("How many mothers took part in the study?\nOptions:\n- 184\n- 6\n- 23\n- 95", "184"),
    Pair("Which factor influenced success the most?\nLet's think step by step.",
         "The regression shows breastfeeding self-efficacy with OR 0.111, the strongest effect."
         "\nTherefore, the answer is breastfeeding self-efficacy"),
    Pair("Is the study cross-sectional?\nOptions:\n- yes\n- no\nLet's think step by step.",
         "The text says it was a cross-sectional study.\nTherefore, the answer is yes"),
]


def test_prompt_is_the_released_format() -> None:
    """<s> <CON> text </CON>\\n\\n; earlier documents with their pairs and </s> before it."""
    assert render_prompt(synthesis_prompt("Cats purr.")) == "<s> <CON> Cats purr. </CON>\n\n"
    history = [("Dogs bark.", [Pair("Do dogs bark?", "Yes."), Pair("Why?", "To warn.")]),
               ("Birds sing.", [Pair("Who sings?", "Birds.")])]
    assert render_prompt(synthesis_prompt("Cats purr.", history)) == (
        "<s> <CON> Dogs bark. </CON>\n\n<QUE> Do dogs bark? <ANS> Yes. </END>\n\n<QUE> Why? <ANS> To warn. "
        "</END></s><s> <CON> Birds sing. </CON>\n\n<QUE> Who sings? <ANS> Birds. </END></s>"
        "<s> <CON> Cats purr. </CON>\n\n")
    assert render_prompt(synthesis_prompt(""), bos="[B]") == "[B]"      # released: no context block


@pytest.fixture(scope="module")
def marker_tokenizer(tmp_path_factory):
    docs = [d for d in itertools.islice(iter_builtin_documents(), 80) if len(d) > 200]
    path = train_sentencepiece(docs, str(tmp_path_factory.mktemp("tok") / "tok"), 400,
                               special_tokens=INSTRUCTION_MARKERS, threads=2)
    return load_tokenizer(path)


def test_markers_are_single_tokens_and_specials_become_ids(marker_tokenizer) -> None:
    tok = marker_tokenizer
    marker_ids = set()
    for marker in SYNTHESIZER_MARKERS:             # one piece (after SentencePiece's leading-space piece)
        hits = [i for i in tok.encode(marker) if tok.decode([i]) == marker]
        assert len(hits) == 1, marker
        marker_ids.add(hits[0])
    prompt = synthesis_prompt("a <s> b", [("c", [Pair("q", "r")])])    # a literal <s> in the text stays text
    ids = encode_prompt(prompt, tok.encode, 1, tok.eod_id)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(tok.eod_id) == 1
    assert tok.decode(ids).count("<s>") == 1
    assert sum(i in marker_ids for i in ids) == 2 + 2 + 3             # CON pairs x2, QUE ANS END
    assert encode_prompt([BOS, "x", EOS], tok.encode, None, None) == tok.encode("x")


def _random_pairs(rng: random.Random, n: int) -> list[Pair]:
    words = ["alpha", "Beta", "γάμμα", "12.5%", "(x)", "a-b", "don't", "<p>", "x\ny", "tab\there", "?", "!"]

    def phrase() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))).strip()
    return [Pair(f"{phrase()} {i}?", phrase()) for i in range(n)]


def test_format_then_parse_round_trips() -> None:
    rng = random.Random(0)
    for n in range(0, 12):
        pairs = _random_pairs(rng, n)
        parsed = parse_pairs(pairs_block(pairs))
        assert parsed.pairs == pairs and (parsed.malformed, parsed.duplicates, parsed.unfinished) == (0, 0, False)
    doc = Synthesized(7, "text", _random_pairs(rng, 3), prev=3)
    assert record_of(record_json(doc)) == doc


def test_real_synthesizer_output_parses() -> None:
    parsed = parse_pairs(REAL_OUTPUT)
    assert parsed.pairs == REAL_PAIRS and parsed.malformed == 0 and not parsed.unfinished
    tasks = [task_of(p) for p in parsed.pairs]
    assert tasks[1].options == ("184", "6", "23", "95") and tasks[1].answer == "184"
    assert tasks[2].cot.endswith("the strongest effect") and tasks[2].answer == "breastfeeding self-efficacy"
    assert tasks[3].options == ("yes", "no") and tasks[3].cot and tasks[3].answer == "yes"


@pytest.mark.parametrize("output,pairs,malformed,duplicates,unfinished", [
    ("<QUE> q1 <ANS> a1 </END>\n\n<QUE> q2 <ANS> a2", 1, 1, 0, True),                  # cut by max tokens
    ("<QUE> q1 <ANS> a1 </END>\n\n<QUE> q2 <ANS> a2 </END>\n\n", 2, 0, 0, False),      # trailing blank
    ("<QUE> q1 a1 </END>", 0, 1, 0, False),                                            # no answer marker
    ("<QUE> q1 <ANS> a1 <ANS> a2 </END>", 0, 1, 0, False),                             # two answer markers
    ("q1 <ANS> a1 </END>", 0, 1, 0, False),                                            # no question marker
    ("junk <QUE> q1 <ANS> a1 </END>", 0, 1, 0, False),                                 # text before it
    ("<QUE> q1 <ANS>   </END>", 0, 1, 0, False),                                       # empty answer
    ("<QUE>  <ANS> a </END>", 0, 1, 0, False),                                         # empty question
    ("<QUE> Q1 <ANS> a </END><QUE> q1 <ANS> b </END>", 1, 0, 1, False),                # duplicate, any case
    ("", 0, 0, 0, False),
    ("no pairs at all", 0, 1, 0, True),
])
def test_malformed_generations_are_dropped_and_counted(output, pairs, malformed, duplicates, unfinished) -> None:
    parsed = parse_pairs(output)
    assert (len(parsed.pairs), parsed.malformed, parsed.duplicates, parsed.unfinished) == \
        (pairs, malformed, duplicates, unfinished)


def test_templates_keep_every_pair_and_are_deterministic() -> None:
    doc = Synthesized(0, "Exclusive breastfeeding for twin babies: a study in East Java.", REAL_PAIRS)
    seen, listed = set(), set()
    for seed in range(40):
        (text,) = format_chain([doc], seed, lambda t: True)
        assert format_chain([doc], seed, lambda t: True) == [text]          # same seed, same text
        seen.add(text)
        assert doc.text in text and REAL_PAIRS[0].question in text and REAL_PAIRS[0].answer in text
        assert "How many mothers took part in the study?" in text and "Options:\n-" not in text
        shown = all(o in text for o in ("184", "95", "23"))                  # options kept, relettered,
        assert shown or ("184" in text and "95" not in text and "23" not in text)  # or left out, answer as text
        listed.add(shown)
        assert "the strongest effect" in text and "breastfeeding self-efficacy" in text
        assert "Let's think step by step." not in text and "Therefore, the answer is" not in text
    assert len(seen) >= 30                                                # varied templates
    assert listed == {True, False}                # half the option patterns leave the options out


def test_broken_special_forms_are_dropped_and_counted() -> None:
    broken = [Pair("Why?\nLet's think step by step.", "no conclusion marker"),
              Pair("Pick\nOptions:\n- ", "x"), Pair("Fine?", "Yes.")]
    stats = FormatStats()
    (text,) = format_chain([Synthesized(0, "Body.", broken)], 1, lambda t: True, stats)
    assert (stats.pairs, stats.dropped_pairs, stats.documents, stats.texts) == (1, 2, 1, 1)
    assert "Fine?" in text and "no conclusion marker" not in text


def _doc(i: int, n_pairs: int, prev=None, words: int = 5) -> Synthesized:
    return Synthesized(i, " ".join([f"doc{i}"] * words), [Pair(f"q{i}.{k}?", f"a{i}.{k}") for k in range(n_pairs)],
                       prev)


def test_multi_round_chains_and_history() -> None:
    # round 0: 0 1 2; round 1: 3 4 5 after 0 1 2; round 2: 6 7 8 after 3 4 5
    docs = [_doc(0, 2), _doc(1, 0), _doc(2, 1), _doc(3, 1, prev=0), _doc(4, 1, prev=None), _doc(5, 0, prev=2),
            _doc(6, 2, prev=3), _doc(7, 1, prev=4), _doc(8, 1)]
    got = [[d.id for d in c] for c in chains(reversed(docs))]
    assert got == [[0, 3, 6], [1], [2], [4, 7], [5], [8]]   # 5 got no pairs: it continues nothing
    records = {d.id: d for d in docs}
    assert [d.id for d in history_of(records, 6)] == [6, 3, 0]
    assert [d.id for d in history_of(records, 5)] == []                # no pairs: nothing to show
    assert [d.id for d in history_of(records, 7)] == [7, 4]             # 4 was prompted alone


def test_few_shot_texts_fit_the_sequence() -> None:
    chain = [_doc(0, 2), _doc(1, 2, prev=0), _doc(2, 2, prev=1), _doc(3, 2, prev=2, words=200), _doc(4, 2, prev=3)]
    limit = 400
    texts = format_chain(chain, 3, lambda t: len(t) <= limit)
    joined = "".join(texts)
    assert [joined.index(f"doc{i}") for i in range(5)] == sorted(joined.index(f"doc{i}") for i in range(5))
    assert len(texts) >= 3 and all(len(t) <= limit or t.count("doc3") == 200 for t in texts)
    assert any("doc0" in t and "doc1" in t for t in texts)             # several documents per text
    assert pack(["a", "b", "c"], "+", lambda t: len(t) <= 3) == ["a+b", "c"]
    assert pack(["long", "b"], "+", lambda t: len(t) <= 2) == ["long", "b"]
