import json

import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit.analysis import Report, kl


def test_analyze_a_classifier(rescnn, quantized, tmp_path):
    m, x, y = rescnn
    q = quantized(m, 4, 8)
    r = lb.analyze(m, q, [x[:200], x[200:]], labels=y, budget=4.0, refine=False)   # certify is tested on its own
    assert isinstance(r, Report)
    mm = r.model
    with torch.no_grad():
        zf, zq = m(x), q(x)
    assert mm["metric"] == "kl" and mm["samples"] == len(y)
    assert mm["accuracy_float"] == pytest.approx(float((zf.argmax(1) == y).double().mean()))
    assert mm["accuracy_quant"] == pytest.approx(float((zq.argmax(1) == y).double().mean()))
    assert mm["kl"] == pytest.approx(float(kl(zf, zq).mean()), rel=1e-4)
    assert 0 <= mm["certified_fraction"] <= 1 and r.bound["violations"] == 0
    # the first-order limit beside the certified fraction, and per input the largest contributors
    assert 0 <= mm["certified_limit"] <= 1 and "limit" in r.summary()
    assert r.bound["per_input"] and {"c1", "c2", "fc"} <= set(r.bound["sources"])
    assert [row["layer"] for row in r.layers] == ["c1", "c2", "fc"]
    ranks = sorted(row["rank"] for row in r.layers)
    assert ranks == [1, 2, 3]
    for row in r.layers:
        assert row["bits"] == 4 and row["weight_clip_mse"] + row["weight_round_mse"] == pytest.approx(row["weight_mse"])
        assert row["suggested_bits"] in (2, 3, 4, 6, 8)
    assert r.mixed["average_bits"] <= 4.0 and "uniform_accuracy" in r.mixed
    assert mm["total_bits"] == pytest.approx(mm["model_bits"] + mm["data_bits"])

    data = json.loads(r.to_json(tmp_path / "report.json"))   # strict JSON (no NaN/Infinity)
    assert json.loads((tmp_path / "report.json").read_text()) == data
    assert data["model"]["kl"] == pytest.approx(mm["kl"])
    html = r.to_html(tmp_path / "report.html").read_text()
    assert html.count("<svg") >= 1 + 4 * 3 + 1    # sensitivity bars, per layer 2 sweeps + 2 histograms, KL scatter
    for needle in ("<script", "src=", "href=", "@import", "url("):
        assert needle not in html                 # self-contained: nothing is fetched, nothing runs
    assert "c2" in html and "clip vs round" in html

    text = str(r)                                     # the printable summary reads the same numbers
    assert f"accuracy {mm['accuracy_float']:.2%} -> {mm['accuracy_quant']:.2%}" in text
    assert f"KL(float || quantized) {mm['kl']:.3g}" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[-3:]}
    assert set(rows) == {"c1", "c2", "fc"}
    for row in r.layers:
        assert rows[row["layer"]][-1] == str(row["rank"]) and rows[row["layer"]][1] == "4"
    assert "print()" in repr(r) and len(repr(r)) < 200


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def test_models_without_softmax_outputs_get_anatomy_and_sensitivity(digits, quantized):
    torch.manual_seed(0)
    m = _Embed().eval()
    x = digits[2]
    q = quantized(m, 4, 8)
    lb.freeze(q)
    r = lb.analyze(m, q, [x])
    assert r.model["metric"] == "cosine" and "kl" not in r.model
    with torch.no_grad():
        ref = float((1 - nn.functional.cosine_similarity(m(x), q(x))).mean())
    assert r.model["divergence"] == pytest.approx(ref, rel=1e-3, abs=1e-7)
    assert set(r.sensitivity["layers"]) == {"fc1", "fc2"}
    assert all(row["weight_sqnr_db"] > 10 for row in r.layers)
    # the GELU blocks the certified bound, and the report says so instead of skipping it silently
    assert r.model["bound_available"] is False and r.model["certified_fraction"] is None
    assert any("GELU" in n for n in r.notes)
    r2 = lb.analyze(m, q, [x], metric="mse", bound=False, mdl=False)
    assert r2.model["metric"] == "mse" and r2.bound is None and r2.mdl is None


def test_bad_arguments(rescnn, quantized):
    m, x, y = rescnn
    q = quantized(m, 8, 8)
    with pytest.raises(ValueError, match="batches is empty"):
        lb.analyze(m, q, [])
    with pytest.raises(TypeError, match="labels"):
        lb.analyze(m, q, [x], labels=[0, 1])
    with pytest.raises(ValueError, match="labels has"):
        lb.analyze(m, q, [x], labels=y[:5])
    with pytest.raises(ValueError, match="metric"):
        lb.analyze(m, q, [x], metric="l1")
    with pytest.raises(ValueError, match="lb.quantize"):
        lb.analyze(m, m, [x])
