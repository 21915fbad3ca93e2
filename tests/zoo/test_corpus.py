"""lowbit.zoo.corpus: >= 512 distinct real sentences from the Python reference, deterministic."""
import re

import pytest

from lowbit import zoo


def test_at_least_512_distinct_sentences_of_reasonable_length():
    s = zoo.sentences()
    assert len(s) == 512 and len(set(s)) == 512
    assert len(zoo.all_sentences()) >= 512
    for x in s:
        assert 6 <= len(x.split()) <= 40, x
        assert x[-1] in ".!?" and x == " ".join(x.split())


def test_sentences_are_real_text_from_pydoc_topics():
    from pydoc_data.topics import topics
    words = re.compile(r"[A-Za-z]+")
    reference = " ".join(words.findall(" ".join(topics.values())))
    for x in zoo.sentences(64):
        # the sentence's words occur, in order, in the documentation text (line wraps and
        # hyphenation joins aside, which is why only the first six words are compared)
        head = " ".join(words.findall(x)[:6])
        assert head in reference, x


def test_deterministic_and_spread_over_the_corpus():
    assert zoo.sentences() == zoo.sentences()
    assert zoo.corpus_fingerprint() == zoo.corpus_fingerprint(zoo.sentences())
    pool = zoo.all_sentences()
    picked = zoo.sentences(100)
    positions = [pool.index(x) for x in picked]
    assert positions == sorted(positions)
    assert positions[0] < len(pool) * 0.05 and positions[-1] > len(pool) * 0.95
    assert zoo.sentences(None) == list(pool)


def test_bad_sizes():
    with pytest.raises(ValueError, match="n must be between"):
        zoo.sentences(0)
    with pytest.raises(ValueError, match="n must be between"):
        zoo.sentences(10**6)
    with pytest.raises(TypeError, match="n must be"):
        zoo.sentences(2.5)
