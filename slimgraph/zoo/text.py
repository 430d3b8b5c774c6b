"""English prose for calibration and evaluation, offline: the documentation CPython ships.

`pydoc_data.topics` (part of the standard library, used by `help()`) holds the language
reference's topics as plain text, about 465 KB. A paragraph is a block of lines between blank
lines, joined into one line (list markers and footnote marks removed); it is kept when it reads
as prose: between `MIN_WORDS` and `MAX_WORDS` words, at least 70% of them plain words, ending
like a sentence. Headings (underlined), tables (boxed), grammar rules and code are left out.

Calibration and held-out text come from disjoint sets of topics (a topic's SHA-256 decides,
so the split does not move when a Python release adds a topic), and a paragraph that occurs in
both is kept only on the calibration side: the two never share a paragraph. Within each side,
paragraphs are ordered by their SHA-256, which mixes topics and is the same on every run and
machine. The text itself differs slightly between Python versions.
"""

from __future__ import annotations

import functools
import hashlib
import re

from slimgraph.errors import SlimgraphError

MIN_WORDS, MAX_WORDS = 20, 200
HELDOUT_SHARE = 3  # one topic in three is held out
UNDERLINE = re.compile(r"^([*=\-~^\"'`#+])\1{2,}$")  # a heading's underline
FOOTNOTE = re.compile(r"\s*\[\d+\]")
LIST_MARKER = re.compile(r"^(\*|-|\d+\.|\(\d+\))\s+")
WORD = re.compile(r"[(\"“]?[A-Za-z][a-z’'-]*[)\"”]?[.,;:]?")  # a plain English word with its punctuation


def calibration_texts(n: int | None = None) -> list[str]:
    """The first `n` calibration paragraphs (all when None)."""
    return _take(_split()[0], n, "calibration")


def heldout_texts(n: int | None = None) -> list[str]:
    """The first `n` held-out evaluation paragraphs (all when None); none is a calibration paragraph."""
    return _take(_split()[1], n, "held-out")


def heldout_topic(topic: str) -> bool:
    return hashlib.sha256(topic.encode()).digest()[0] % HELDOUT_SHARE == 0


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one topic, each joined into one line."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        if not lines or any(UNDERLINE.match(line) for line in lines) or block.lstrip()[:1] in ("+", "|"):
            continue  # a heading or a table
        paragraph = " ".join(FOOTNOTE.sub("", LIST_MARKER.sub("", " ".join(lines))).replace("**", "").split())
        if _prose(paragraph):
            found.append(paragraph)
    return found


def _prose(paragraph: str) -> bool:
    """Sentences, not code or grammar: ends like a sentence, mostly words, of a useful length."""
    words = paragraph.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not paragraph.endswith((".", ".)", '."')):
        return False
    if "::=" in paragraph or ">>>" in paragraph or " # " in paragraph:  # grammar, sessions, commented code
        return False
    return sum(WORD.fullmatch(w) is not None for w in words) >= 0.7 * len(words)


@functools.cache
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from pydoc_data.topics import topics

    calibration: dict[str, None] = {}
    heldout: dict[str, None] = {}
    for topic in sorted(topics):
        side = heldout if heldout_topic(topic) else calibration
        side.update(dict.fromkeys(paragraphs(topics[topic])))
    shared = calibration.keys() & heldout.keys()
    return _ordered(calibration), _ordered(p for p in heldout if p not in shared)


def _ordered(texts) -> tuple[str, ...]:
    return tuple(sorted(texts, key=lambda p: hashlib.sha256(p.encode()).digest()))


def _take(texts: tuple[str, ...], n: int | None, side: str) -> list[str]:
    if n is None:
        return list(texts)
    if not 0 <= n <= len(texts):
        raise SlimgraphError(f"asked for {n} {side} paragraphs; this Python's pydoc_data has {len(texts)}")
    return list(texts[:n])
