"""The report as one self-contained HTML page: tables and inline SVG plots, no scripts, no network."""
from __future__ import annotations

import math
from html import escape
from typing import Any

from . import svg

__all__ = ["render"]

_CSS = """body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:12px}
.note{color:#a33}h2{border-bottom:1px solid #ddd;padding-bottom:4px}small{color:#666}"""


def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return escape(str(v))
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return escape(", ".join(map(str, v)) if isinstance(v, list) else str(v))
    return escape(str(v))


def _table(rows: list[dict], keys: list[str] | None = None) -> str:
    if not rows:
        return "<p><small>(empty)</small></p>"
    keys = keys or [k for k in dict.fromkeys(k for r in rows for k in r) if k != "notes"]
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(d: dict) -> str:
    return _table([{"quantity": k, "value": v} for k, v in d.items() if not isinstance(v, dict)])


def _sweep_plot(name: str, what: str, t) -> str:
    sw = t.sweep
    return svg.lines(sw["ratio"], {"total": sw["mse"], "clip": sw["clip_mse"], "round": sw["round_mse"]},
                     f"{name} {what}: clip vs round", "range / max range", "mse", log_y=True,
                     markers={"chosen": t.chosen_ratio, "best": t.best_ratio})


def _hist_plot(name: str, what: str, t) -> str:
    h = t.histogram
    extra = f" (beyond: {h['below'] + h['above']})" if h["below"] + h["above"] else ""
    return svg.histogram(h["edges"], h["counts"], f"{name} {what} error / step{extra}", "(x^ - x) / s")


def render(report) -> str:
    """HTML text of a :class:`~lowbit.analysis.report.Report`."""
    m = report.model
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lowbit analysis</title>"
             f"<style>{_CSS}</style></head><body><h1>lowbit analysis</h1>"]
    parts.append("<h2>Model</h2>" + _kv({k: v for k, v in m.items() if k != "quantization"}))
    if "quantization" in m:
        q = m["quantization"]
        parts.append(f"<p><small>weights {escape(str(q.get('weights')))}, activations "
                     f"{escape(str(q.get('activations')))}, observer {escape(str(q.get('observer')))}; "
                     f"float layers: {escape(str(q.get('skipped') or 'none'))}</small></p>")
    for n in report.notes:
        parts.append(f"<p class='note'>{escape(n)}</p>")

    if report.sensitivity:
        s = report.sensitivity
        names = s["ranking"]
        parts.append("<h2>Per-layer sensitivity</h2><p><small>Output divergence (" + escape(s["metric"]) +
                     ") with only that layer quantized; sum / all layers together = "
                     f"{_fmt(s['additivity'])}</small></p>")
        parts.append(svg.bars(names, [s["layers"][n] for n in names], f"sensitivity ({s['metric']})", log=True))
    parts.append("<h2>Layers</h2>" + _table(report.layers))

    parts.append("<h2>Error anatomy</h2><p><small>Clip sweep: mse of the tensor for a range of r times its "
                 "max range (clip: saturated elements, round: the rest); <b>chosen</b> marks the layer's range, "
                 "<b>best</b> the sweep's minimum. Histograms: error in units of the step (uniform on "
                 "[-0.5, 0.5] is pure rounding, tails are clipping).</small></p>")
    for name, a in report.anatomy.items():
        plots = [_sweep_plot(name, "weight", a.weight), _hist_plot(name, "weight", a.weight)]
        if a.input is not None:
            plots += [_sweep_plot(name, "input", a.input), _hist_plot(name, "input", a.input)]
        parts.append(f"<h3>{escape(name)}</h3><div class='grid'>" + "".join(plots) + "</div>")

    if report.kl_points:
        parts.append("<h2>KL: predicted vs exact</h2><p><small>Per sample: exact KL(p||q) against "
                     "Var_p[dz]/2; points on the diagonal are predicted exactly. Relative error of the mean: "
                     f"{_fmt(m.get('kl_relative_error'))}</small></p>")
        parts.append(svg.scatter(report.kl_points["exact"], report.kl_points["predicted"],
                                 "predicted vs exact KL", "exact KL", "predicted KL"))
    if report.bound:
        b = report.bound
        parts.append("<h2>Certified predictions</h2><p><small>Sound bounds on the change of every logit "
                     "difference z_t - z_k (t: the float top-1 class); an input is certified when no difference "
                     "can change sign. Worst-case rounding: every activation rounding may fall anywhere within "
                     "half a step (holds for any integer kernel of the same grids, whatever its tie-breaking); "
                     "exact rounding: the rounding this model performs. The first-order limit linearises the "
                     "quantized model and lets every rounding move by half a step: no sound certificate under "
                     "worst-case rounding can certify much more.</small></p>")
        parts.append(_kv({k: v for k, v in b.items() if k not in ("per_input", "sources")}))
        if b.get("sources"):
            parts.append("<p><small>Mean share of each input's binding bound, by source (a quantized layer: its "
                         "input grid, its weight error and roundoff; relaxations: ReLU, pooling, clipping):"
                         "</small></p>" + _table([{"source": k, "share": v} for k, v in b["sources"].items()]))
        if b.get("per_input"):
            parts.append("<p><small>Per input, the largest contributors to its bound (logits):</small></p>" +
                         _table([{"input": r["input"], "certified": r["certified"],
                                  **{f"#{i + 1}": f"{n} ({v:.3g})" for i, (n, v) in enumerate(r["top_sources"])}}
                                 for r in b["per_input"]]))
        if isinstance(b.get("exact_rounding"), dict):
            parts.append("<p><small>exact rounding:</small></p>" + _kv(b["exact_rounding"]))
    if report.mdl:
        d = report.mdl
        parts.append("<h2>Description length</h2>" + _kv({k: v for k, v in d.items() if k != "layers"}))
        parts.append(_table(d["layers"]))
    if report.mixed:
        mx = report.mixed
        parts.append("<h2>Mixed precision</h2>" + _kv({k: v for k, v in mx.items() if k not in ("bits", "candidates")}))
        parts.append(_table([{"layer": n, "bits": b, **{f"S({k})": v for k, v in mx.get("candidates", {}).get(n, {}).items()}}
                             for n, b in mx["bits"].items()]))
    parts.append("<h2>Timings (s)</h2>" + _kv(report.timings))
    parts.append("</body></html>")
    return "\n".join(parts)
