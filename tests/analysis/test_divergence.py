import math

import pytest
import torch

from lowbit.analysis import cosine_distance, kl, kl_predicted, kl_summary, output_mse


def _naive_kl(zf, zq):
    out = []
    for a, b in zip(zf.tolist(), zq.tolist()):
        ma, mb = max(a), max(b)
        la = math.log(sum(math.exp(v - ma) for v in a)) + ma
        lb_ = math.log(sum(math.exp(v - mb) for v in b)) + mb
        out.append(sum(math.exp(x - la) * ((x - la) - (y - lb_)) for x, y in zip(a, b)))
    return torch.tensor(out, dtype=torch.float64)


def _naive_var(zf, zq):
    out = []
    for a, b in zip(zf.tolist(), zq.tolist()):
        m = max(a)
        w = [math.exp(v - m) for v in a]
        p = [v / sum(w) for v in w]
        d = [y - x for x, y in zip(a, b)]
        mean = sum(pi * di for pi, di in zip(p, d))
        out.append(0.5 * sum(pi * (di - mean) ** 2 for pi, di in zip(p, d)))
    return torch.tensor(out, dtype=torch.float64)


def test_kl_and_prediction_match_a_naive_float64_reference_even_for_large_logits():
    g = torch.Generator().manual_seed(0)
    zf = torch.randn(64, 10, generator=g) * 8 + 300   # exp(300) overflows a naive softmax without the max shift
    zq = zf + torch.randn(64, 10, generator=g) * 0.5
    torch.testing.assert_close(kl(zf, zq), _naive_kl(zf.double(), zq.double()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kl_predicted(zf, zq), _naive_var(zf.double(), zq.double()), rtol=1e-9, atol=1e-12)
    assert kl(zf, zq).shape == (64,) and bool((kl(zf, zq) >= 0).all())


def test_second_order_prediction_becomes_exact_as_the_perturbation_shrinks():
    g = torch.Generator().manual_seed(1)
    zf = torch.randn(2000, 10, generator=g, dtype=torch.float64) * 3
    d = torch.randn(2000, 10, generator=g, dtype=torch.float64)
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        exact, pred = kl(zf, zf + eps * d), kl_predicted(zf, zf + eps * d)
        errs.append(float(((pred / exact) - 1).abs().median()))
    # the relative error is O(eps): it shrinks about tenfold per decade and is tiny at eps = 1e-3
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] < 0.3 * errs[0] and errs[2] < 0.3 * errs[1]
    assert errs[2] < 5e-3
    s = kl_summary(zf, zf + 1e-3 * d)
    assert s.relative_error < 5e-3 and s.samples == 2000


def test_both_are_invariant_to_adding_a_constant_to_all_logits():
    g = torch.Generator().manual_seed(2)
    zf = torch.randn(32, 7, generator=g, dtype=torch.float64)
    zq = zf + 0.3 * torch.randn(32, 7, generator=g, dtype=torch.float64)
    cf = torch.randn(32, 1, generator=g, dtype=torch.float64) * 50
    cq = torch.randn(32, 1, generator=g, dtype=torch.float64) * 50
    torch.testing.assert_close(kl(zf + cf, zq + cq), kl(zf, zq), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kl_predicted(zf + cf, zq + cq), kl_predicted(zf, zq), rtol=1e-9, atol=1e-12)


def test_a_large_change_is_not_second_order():
    zf = torch.tensor([[5.0, 0.0, 0.0]])
    zq = torch.tensor([[0.0, 5.0, 0.0]])
    assert abs(float(kl_predicted(zf, zq)) - float(kl(zf, zq))) / float(kl(zf, zq)) > 0.2


def test_mse_and_cosine_match_torch():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    torch.testing.assert_close(output_mse(a, b), ((a - b) ** 2).mean(1).double())
    torch.testing.assert_close(cosine_distance(a, b), (1 - torch.nn.functional.cosine_similarity(a, b)).double(),
                               rtol=1e-5, atol=1e-6)
    assert float(cosine_distance(a, 3 * a).abs().max()) < 1e-12


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="z_float has shape .* but z_quant has"):
        kl(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(TypeError, match="z_float"):
        kl(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="z_quant"):
        kl_predicted(torch.zeros(3, 4), [[0.0] * 4] * 3)
