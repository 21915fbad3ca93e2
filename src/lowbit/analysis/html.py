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
.note{color:#a33}h2{border-bottom:1px solid #ddd;padding-bottom:4px}small{color:#666}
.scroll{overflow-x:auto;max-width:100%}td.text,th.text{text-align:left;max-width:640px;overflow-wrap:anywhere}
td.name{text-align:left;min-width:12em}.warn{color:#a33;font-weight:bold}"""


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
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _name(text: str) -> str:
    """A dotted module name, escaped, that may wrap after its dots (never inside a word)."""
    return escape(text).replace(".", ".<wbr>")


def _text_table(rows: list[dict], keys: list[str], heads: list[str]) -> str:
    """A table of text (left-aligned, long cells wrap): the first column holds names."""
    head = "".join(f"<th class='text'>{escape(h)}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td class='{'name' if i == 0 else 'text'}'>{r.get(k, '')}</td>"
                                    for i, k in enumerate(keys)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix all ``names`` share (``"model.encoder."``), if stripping it leaves every name non-empty."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return ".".join(parts[0][:k]) + "." if k else ""


_LAYER_KEYS = [("layer", "layer"), ("kind", "kind"), ("bits", "bits"), ("weights", "weights"),
               ("weight_spec", "weight grid"), ("input_spec", "input grid"), ("weight_sqnr_db", "w SQNR dB"),
               ("weight_clip_share", "w clip share"), ("input_sqnr_db", "in SQNR dB"),
               ("input_clip_share", "in clip share"), ("sensitivity", "sensitivity"), ("rank", "rank"),
               ("entropy_bits_per_weight", "entropy bits/w"), ("suggested_bits", "suggested bits")]


_SHARED = ("kind", "bits", "weight_spec", "input_spec")   # shown once above the table when every layer has the same


def _layers_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><small>(empty)</small></p>"
    same = {k: rows[0].get(k) for k in _SHARED if len(rows) > 1 and len({str(r.get(k)) for r in rows}) == 1}
    keys = [(k, h) for k, h in _LAYER_KEYS if k not in same and any(r.get(k) is not None for r in rows)]
    heads = dict(_LAYER_KEYS)
    shared = "; ".join(f"{heads[k]} {_fmt(v)}" for k, v in same.items())
    head = "".join(f"<th>{escape(h)}</th>" for _, h in keys)
    body = "".join("<tr>" + "".join(f"<td class='name'>{_name(str(r.get(k)))}</td>" if k == "layer" else
                                    f"<td>{_fmt(r.get(k))}</td>" for k, _ in keys) + "</tr>" for r in rows)
    return ((f"<p><small>Every layer: {shared}.</small></p>" if shared else "") +
            f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div><p><small>Every column (errors split "
            "into clipping and rounding, chosen and best ranges) is in report.json.</small></p>")


def _coverage_section(report) -> str:
    cov = getattr(report, "coverage", None)
    q = report.model.get("quantization") or {}
    if cov is None:
        rows = [{"layer": n, "kind": None, "reason": why, "linear_like": False} for n, why in (q.get("skipped") or {}).items()]
        quantized = len(q.get("quantized") or [])
    else:
        rows, quantized = cov["float"], cov["quantized"]
    parts = [f"<h2>Layers left float</h2><p><small>{quantized} modules quantized, {len(rows)} left float "
             "(every module holding parameters is one or the other).</small></p>"]
    if rows:
        table = [{"layer": _name(r["layer"]), "kind": escape(r["kind"] or ""),
                  "reason": ("<span class='warn'>WARNING, a Linear-like layer left float: </span>" if r["linear_like"]
                             else "") + escape(r["reason"])} for r in rows]
        parts.append(_text_table(table, ["layer", "kind", "reason"], ["layer", "kind", "why it stayed float"]))
    for group in (cov or {}).get("tied", []):
        parts.append(f"<p><small>tied, one set of codes: {escape(' = '.join(group))}</small></p>")
    for name, why in (cov or {}).get("untied", {}).items():
        parts.append(f"<p><small>untied {escape(name)}: {escape(why)}</small></p>")
    for name, first in (cov or {}).get("aliases", {}).items():
        parts.append(f"<p><small>{escape(name)} is the module {escape(first)} (reached by a second path)</small></p>")
    return "".join(parts)


def _kv(d: dict) -> str:
    return _table([{"quantity": k, "value": v} for k, v in d.items() if not isinstance(v, dict)])


def _sweep_plot(name: str, what: str, t) -> str:   # the layer's name heads its group of plots
    sw = t.sweep
    return svg.lines(sw["ratio"], {"total": sw["mse"], "clip": sw["clip_mse"], "round": sw["round_mse"]},
                     f"{what}: clip vs round", "range / max range", "mse", log_y=True,
                     markers={"chosen": t.chosen_ratio, "best": t.best_ratio})


def _hist_plot(name: str, what: str, t) -> str:
    h = t.histogram
    extra = f" (beyond: {h['below'] + h['above']})" if h["below"] + h["above"] else ""
    return svg.histogram(h["edges"], h["counts"], f"{what} error / step{extra}", "(x^ - x) / s")


def render(report) -> str:
    """HTML text of a :class:`~lowbit.analysis.report.Report`."""
    m = report.model
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lowbit analysis</title>"
             f"<style>{_CSS}</style></head><body><h1>lowbit analysis</h1>"]
    parts.append("<h2>Model</h2>" + _kv({k: v for k, v in m.items() if k != "quantization"}))
    if "quantization" in m:
        q = m["quantization"]
        parts.append(f"<p><small>weights {escape(str(q.get('weights')))}, activations "
                     f"{escape(str(q.get('activations')))}, observer {escape(str(q.get('observer')))}</small></p>")
    for n in report.notes:
        parts.append(f"<p class='note'>{escape(n)}</p>")
    if "quantization" in m or getattr(report, "coverage", None) is not None:
        parts.append(_coverage_section(report))

    if report.sensitivity:
        s = report.sensitivity
        names = s["ranking"]
        prefix = _common_prefix(names)
        where = f"; every name below starts with <code>{escape(prefix)}</code>" if prefix else ""
        parts.append("<h2>Per-layer sensitivity</h2><p><small>Output divergence (" + escape(s["metric"]) +
                     ") with only that layer quantized; sum / all layers together = "
                     f"{_fmt(s['additivity'])}{where}</small></p>")
        parts.append("<div class='scroll'>" + svg.bars([n[len(prefix):] for n in names], [s["layers"][n] for n in names],
                                                       f"sensitivity ({s['metric']})", log=True) + "</div>")
    parts.append("<h2>Quantized layers</h2>" + _layers_table(report.layers))

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
    elif getattr(report, "bound_unavailable", None):
        u = report.bound_unavailable
        parts.append(f"<h2>Certified predictions</h2><p>Not available: {escape(u['why'])}.</p>"
                     f"<p><small>What would make it available: {escape(u['remedy'])}</small></p>")
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
