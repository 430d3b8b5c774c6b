"""English prose from CPython's own documentation: disjoint, deterministic calibration and held-out text."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slimgraph.errors import SlimgraphError
from slimgraph.zoo import text


def test_calibration_and_heldout_never_overlap():
    calibration, heldout = text.calibration_texts(), text.heldout_texts()
    assert len(calibration) >= 400 and len(heldout) >= 150
    assert not set(calibration) & set(heldout)
    assert len(set(calibration)) == len(calibration) and len(set(heldout)) == len(heldout)
    from pydoc_data.topics import topics

    held = [t for t in topics if text.heldout_topic(t)]
    assert 0 < len(held) < len(topics)
    from_held_topics = {p for t in held for p in text.paragraphs(topics[t])}
    assert set(heldout) <= from_held_topics  # only held-out topics (a paragraph they share is calibration text)


def test_paragraphs_are_prose_of_reasonable_length():
    for paragraph in text.calibration_texts() + text.heldout_texts():
        words = paragraph.split()
        assert text.MIN_WORDS <= len(words) <= text.MAX_WORDS
        assert "\n" not in paragraph and "::=" not in paragraph and "  " not in paragraph


def test_the_first_n_are_a_prefix_and_the_same_in_another_process():
    assert text.calibration_texts(8) == text.calibration_texts()[:8]
    assert text.heldout_texts(0) == []
    code = "from slimgraph.zoo import text; print(repr(text.heldout_texts(5)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"}).stdout
    assert other.strip() == repr(text.heldout_texts(5))


def test_asking_for_more_than_there_is():
    with pytest.raises(SlimgraphError, match=r"asked for 100000 held-out paragraphs; this Python's pydoc_data has \d+"):
        text.heldout_texts(100_000)


def test_what_counts_as_a_paragraph():
    topic = """The "demo" statement
********************

A demo statement shows how a paragraph of prose is found. It spans a few lines
of text, and its footnote mark is dropped [3] while its words are kept as they are.

   demo_stmt ::= "demo" expression ["," expression]

   if __debug__:
       do_something()

+------+------+
| a    | b    |
+------+------+

Too short to be useful.

* A list item is prose too when it is long enough: it reads like a sentence and
  ends like one, which is what this item does, with enough words in it.
"""
    assert text.paragraphs(topic) == [
        "A demo statement shows how a paragraph of prose is found. It spans a few lines of text, and its footnote "
        "mark is dropped while its words are kept as they are.",
        "A list item is prose too when it is long enough: it reads like a sentence and ends like one, which is what "
        "this item does, with enough words in it.",
    ]
