"""An offline corpus of real English sentences for evaluating sentence-embedding models.

Source: the Python Language Reference as shipped inside every CPython installation, in the
standard-library module ``pydoc_data.topics`` (the text ``help("topic")`` shows; written by the
Python documentation authors, PSF licence). Nothing is downloaded and nothing outside the standard
library is needed.

Extraction, deterministic for a given Python version:
1. topics in sorted key order; each topic split into paragraphs at blank lines;
2. paragraphs with an indented line (code, grammar, tables) or an underline line (headings) are
   dropped; the remaining lines are joined (a line ending in ``-`` joins without a space);
3. paragraphs are split into sentences after ``.``, ``!`` or ``?`` followed by a capital letter or
   quote; footnote marks like ``[4]`` are removed;
4. a sentence is kept when it has 6 to 40 words, starts with a capital letter or a quote, ends with
   ``.``, ``!`` or ``?``, is at least 75% letters and spaces, and holds no grammar (``::=``);
5. exact duplicates are dropped (first occurrence kept).

The full list has well over a thousand sentences (its exact length depends on the Python version,
as the documentation is revised). ``sentences(n)`` picks ``n`` of them evenly spread over the
whole list, so every part of the reference is represented.
"""
from __future__ import annotations

import functools
import hashlib
import re

__all__ = ["sentences", "all_sentences", "corpus_fingerprint", "CORPUS_SOURCE", "DEFAULT_SIZE"]

CORPUS_SOURCE = "CPython standard library pydoc_data.topics (the Python Language Reference text)"
DEFAULT_SIZE = 512

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(“])")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")


def _paragraph_text(par: str) -> str | None:
    lines = par.split("\n")
    if any(line.startswith((" ", "\t")) for line in lines):
        return None
    if any(line.strip() and set(line.strip()) <= set("*=-~^") for line in lines):
        return None
    out = ""
    for line in (line.strip() for line in lines):
        if not line:
            continue
        if out.endswith("-") and not out.endswith("--"):
            out += line
        else:
            out = f"{out} {line}" if out else line
    return out or None


def _keep(s: str) -> bool:
    words = s.split()
    if not 6 <= len(words) <= 40:
        return False
    if not (s[0].isupper() or s[0] in "\"'“") or s[-1] not in ".!?":
        return False
    if "::=" in s or ">>>" in s:
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.75 * len(s)


@functools.lru_cache(maxsize=1)
def all_sentences() -> tuple[str, ...]:
    """Every sentence the extraction keeps, in document order, deduplicated."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - a stripped Python without pydoc_data
        raise ImportError("the built-in sentence corpus needs the standard-library module "
                          "pydoc_data (missing from this Python build); pass your own sentences instead") from e
    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for par in re.split(r"\n\s*\n", topics[key]):
            text = _paragraph_text(par)
            if text is None:
                continue
            for s in _SPLIT.split(_FOOTNOTE.sub("", text)):
                s = " ".join(s.split())
                if s and _keep(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def sentences(n: int | None = DEFAULT_SIZE) -> list[str]:
    """``n`` distinct real English sentences (default 512), evenly spread over the corpus; all if ``n`` is None."""
    pool = all_sentences()
    if n is None:
        return list(pool)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None; got {type(n).__name__}")
    if not 1 <= n <= len(pool):
        raise ValueError(f"n must be between 1 and {len(pool)} (the corpus size); got {n}")
    return [pool[(i * len(pool)) // n] for i in range(n)]


def corpus_fingerprint(texts: list[str] | None = None) -> str:
    """12 hex digits of SHA-256 over the sentences (default: ``sentences()``), to record which corpus was used."""
    texts = sentences() if texts is None else texts
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
