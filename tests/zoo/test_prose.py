"""lowbit.zoo.prose: an out-of-domain corpus, disjoint from the built-in (technical) one."""
import re

import pytest

from lowbit import zoo
from lowbit.zoo.corpus import _keep


def test_at_least_100_distinct_sentences_following_the_corpus_rules():
    s = zoo.prose_sentences()
    assert len(s) >= 100 and len(set(s)) == len(s)
    assert all(_keep(x) and x == " ".join(x.split()) for x in s)


def test_out_of_domain_no_overlap_with_the_builtin_corpus():
    s = zoo.prose_sentences()
    assert not set(s) & set(zoo.all_sentences())
    # no programming vocabulary: the point is a domain the calibration never saw
    technical = re.compile(r"\b(function|class|object|method|module|attribute|exception|syntax|variable|"
                           r"argument|interpreter|expression|Python)s?\b", re.I)
    assert not [x for x in s if technical.search(x)]
    # the vocabulary of the two corpora differs: most prose words never occur in the reference
    ref_words = set(re.findall(r"[a-z]+", " ".join(zoo.all_sentences()).lower()))
    prose_words = set(re.findall(r"[a-z]+", " ".join(s).lower()))
    assert len(prose_words - ref_words) > 0.5 * len(prose_words)


def test_spread_and_bad_sizes():
    pool = zoo.prose_sentences()
    picked = zoo.prose_sentences(10)
    assert picked[0] == pool[0] and len(set(picked)) == 10
    assert [pool.index(x) for x in picked] == sorted(pool.index(x) for x in picked)
    with pytest.raises(ValueError, match="between 1 and"):
        zoo.prose_sentences(0)
    with pytest.raises(TypeError, match="n must be"):
        zoo.prose_sentences("10")
