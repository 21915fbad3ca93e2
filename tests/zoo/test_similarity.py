"""lowbit.zoo.similarity: Spearman against SciPy (or a naive reference), cosine agreement."""
import itertools
import math

import pytest
import torch

from lowbit import zoo


def _naive_ranks(x):
    """O(n^2): rank = 1 + #smaller + (#equal - 1) / 2 (average rank of ties)."""
    v = x.tolist()
    return torch.tensor([1 + sum(w < a for w in v) + (sum(w == a for w in v) - 1) / 2 for a in v], dtype=torch.float64)


def _naive_spearman(a, b):
    ra, rb = _naive_ranks(a), _naive_ranks(b)
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_references_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 12, (200,), generator=g).double()            # many ties
    b = a + torch.randn(200, generator=g, dtype=torch.float64) * 4
    b[::7] = b[0]                                                     # ties in b too
    assert torch.equal(zoo.rankdata(a), _naive_ranks(a))
    assert zoo.spearman(a, b) == pytest.approx(_naive_spearman(a, b), abs=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert zoo.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_spearman_is_rank_only():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, generator=g, dtype=torch.float64)
    assert zoo.spearman(a, a.exp() * 3 + 1) == pytest.approx(1.0)    # any increasing map
    assert zoo.spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(zoo.spearman(a, torch.ones(100, dtype=torch.float64)))  # a constant has no ranking


def test_pairwise_cosine_is_the_upper_triangle():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(6, 5, generator=g)
    got = zoo.pairwise_cosine(e)
    want = [torch.nn.functional.cosine_similarity(e[i], e[j], dim=0).item() for i, j in itertools.combinations(range(6), 2)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_compare_embeddings_identity_scaling_and_perturbation():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(50, 16, generator=g)
    same = zoo.compare_embeddings(e, e * 3.0)                         # cosine ignores the norm
    assert same.cosine_mean == pytest.approx(1.0) and same.cosine_min == pytest.approx(1.0)
    assert same.spearman == pytest.approx(1.0)
    noisy = zoo.compare_embeddings(e, e + 0.5 * torch.randn(50, 16, generator=g))
    assert noisy.cosine_min < noisy.cosine_mean < 1.0 and noisy.spearman < 1.0
    worse = zoo.compare_embeddings(e, e + 2.0 * torch.randn(50, 16, generator=g))
    assert worse.cosine_mean < noisy.cosine_mean and worse.spearman < noisy.spearman


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        zoo.compare_embeddings(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="sentences, dim"):
        zoo.compare_embeddings(torch.randn(4), torch.randn(4))
    with pytest.raises(TypeError, match="reference"):
        zoo.compare_embeddings([[1.0]], torch.randn(1, 1))
