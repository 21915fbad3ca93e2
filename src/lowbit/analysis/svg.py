"""Tiny inline-SVG charts for the self-contained HTML report (no JavaScript, no network).

Each function returns an ``<svg>`` element as a string: :func:`bars` (horizontal bars, optionally
on a log scale), :func:`lines` (several series over a shared x axis with vertical markers),
:func:`histogram` and :func:`scatter` (log-log with the ``y = x`` diagonal).
"""
from __future__ import annotations

import math
from html import escape
from typing import Sequence

__all__ = ["bars", "lines", "histogram", "scatter", "COLORS"]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
_FONT = 'font-family="sans-serif" font-size="11"'


def _num(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    if 1e3 <= abs(v) < 1e5:
        return f"{v:.0f}"                      # a count: 1330, not 1.33e+03
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e3 else f"{v:.2e}"


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{escape(title)}</title>')
    text = f'<text x="{width / 2}" y="14" text-anchor="middle" {_FONT} font-weight="bold">{escape(title)}</text>'
    return head + text + "".join(body) + "</svg>"


_CHAR = 6.6   # px per character of an 11 px sans-serif label, a little over the widest usual glyph average


def bars(labels: Sequence[str], values: Sequence[float], title: str, log: bool = False, width: int | None = None) -> str:
    """Horizontal bars, one per label (log scale if ``log`` and all values are > 0); labels are
    shown whole: the label column is as wide as the longest label (and ``width`` grows with it)."""
    n = max(len(values), 1)
    row, top = 18, 24
    left = int(max(170, 12 + _CHAR * max([len(str(lab)) for lab in labels] + [0])))
    width = max(width or 0, left + 390)
    height = top + n * row + 24
    vals = [float(v) if math.isfinite(float(v)) else 0.0 for v in values]
    use_log = log and vals and all(v > 0 for v in vals)
    if use_log:
        lo = math.floor(math.log10(min(vals))) - 0.5
        hi = math.log10(max(vals))
        pos = [(math.log10(v) - lo) / max(hi - lo, 1e-9) for v in vals]
    else:
        top_v = max([abs(v) for v in vals] + [1e-300])
        pos = [max(v, 0.0) / top_v for v in vals]
    span = width - left - 70
    body = []
    for i, (lab, v, p) in enumerate(zip(labels, vals, pos)):
        y = top + i * row
        body.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end" {_FONT}>{escape(str(lab))}</text>')
        body.append(f'<rect x="{left}" y="{y + 3}" width="{max(p, 0.0) * span:.1f}" height="{row - 6}" fill="{COLORS[0]}"/>')
        body.append(f'<text x="{left + max(p, 0.0) * span + 4:.1f}" y="{y + 12}" {_FONT}>{_num(v)}</text>')
    if use_log:
        body.append(f'<text x="{left}" y="{height - 6}" {_FONT} fill="#666">log scale</text>')
    return _svg(width, height, body, title)


def _axes(x0: float, y0: float, w: float, h: float, xr, yr, xlabel: str, ylabel: str) -> list[str]:
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    out.append(f'<text x="{x0}" y="{y0 + h + 14}" {_FONT}>{_num(xr[0])}</text>')
    out.append(f'<text x="{x0 + w}" y="{y0 + h + 14}" text-anchor="end" {_FONT}>{_num(xr[1])}</text>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 26}" text-anchor="middle" {_FONT}>{escape(xlabel)}</text>')
    out.append(f'<text x="{x0 - 4}" y="{y0 + 10}" text-anchor="end" {_FONT}>{_num(yr[1])}</text>')
    out.append(f'<text x="{x0 - 4}" y="{y0 + h}" text-anchor="end" {_FONT}>{_num(yr[0])}</text>')
    out.append(f'<text x="12" y="{y0 + h / 2}" transform="rotate(-90 12 {y0 + h / 2})" text-anchor="middle" '
               f'{_FONT}>{escape(ylabel)}</text>')
    return out


def lines(x: Sequence[float], series: dict[str, Sequence[float]], title: str, xlabel: str = "", ylabel: str = "",
          markers: dict[str, float] | None = None, log_y: bool = False, width: int = 360, height: int = 220) -> str:
    """Line chart of ``series`` over ``x``, with labelled vertical ``markers``."""
    x0, y0, w, h = 64, 24, width - 78, height - 70
    tr = (lambda v: math.log10(max(v, 1e-300))) if log_y else float
    ys = [tr(v) for s in series.values() for v in s if math.isfinite(v) and (v > 0 or not log_y)]
    if not x or not ys:
        return _svg(width, 40, [f'<text x="10" y="32" {_FONT}>no data</text>'], title)
    xr, yr = (min(x), max(x)), (min(ys), max(ys))
    if markers:
        xr = (min([xr[0]] + list(markers.values())), max([xr[1]] + list(markers.values())))
    sx = lambda v: x0 + (v - xr[0]) / max(xr[1] - xr[0], 1e-12) * w  # noqa: E731
    sy = lambda v: y0 + h - (tr(v) - yr[0]) / max(yr[1] - yr[0], 1e-12) * h  # noqa: E731
    body = _axes(x0, y0, w, h, xr, (10 ** yr[0], 10 ** yr[1]) if log_y else yr, xlabel, ylabel + (" (log)" if log_y else ""))
    for i, (name, s) in enumerate(series.items()):
        pts = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, s) if math.isfinite(b) and (b > 0 or not log_y))
        body.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[i % 6]}" stroke-width="1.5"/>')
        body.append(f'<text x="{x0 + 6 + 90 * i}" y="{height - 6}" {_FONT} fill="{COLORS[i % 6]}">{escape(name)}</text>')
    for j, (name, v) in enumerate((markers or {}).items()):
        body.append(f'<line x1="{sx(v):.1f}" y1="{y0}" x2="{sx(v):.1f}" y2="{y0 + h}" stroke="#000" stroke-dasharray="3,2"/>')
        right = sx(v) > x0 + w * 0.8
        body.append(f'<text x="{sx(v) + (-3 if right else 3):.1f}" y="{y0 + 12 + 12 * j}" '
                    f'text-anchor="{"end" if right else "start"}" {_FONT}>{escape(name)}</text>')
    return _svg(width, height, body, title)


def histogram(edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str = "",
              width: int = 360, height: int = 200) -> str:
    """Bars over bins ``[edges[i], edges[i+1])``."""
    x0, y0, w, h = 64, 24, width - 78, height - 60
    top = max(list(counts) + [1])
    bw = w / max(len(counts), 1)
    body = _axes(x0, y0, w, h, (edges[0], edges[-1]), (0, top), xlabel, "count")
    for i, c in enumerate(counts):
        bh = c / top * h
        body.append(f'<rect x="{x0 + i * bw:.1f}" y="{y0 + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                    f'height="{bh:.1f}" fill="{COLORS[0]}"/>')
    return _svg(width, height, body, title)


def scatter(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str = "", ylabel: str = "",
            width: int = 360, height: int = 300) -> str:
    """Log-log scatter with the diagonal ``y = x`` (points with a value <= 0 are left out)."""
    pts = [(math.log10(a), math.log10(b)) for a, b in zip(xs, ys) if a > 0 and b > 0 and math.isfinite(a + b)]
    if not pts:
        return _svg(width, 40, [f'<text x="10" y="32" {_FONT}>no data</text>'], title)
    x0, y0, w, h = 64, 24, width - 78, height - 70
    lo = min(min(p) for p in pts)
    hi = max(max(p) for p in pts)
    span = max(hi - lo, 1e-9)
    s = lambda v: (v - lo) / span  # noqa: E731
    body = _axes(x0, y0, w, h, (10 ** lo, 10 ** hi), (10 ** lo, 10 ** hi), xlabel + " (log)", ylabel + " (log)")
    body.append(f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0}" stroke="#999" stroke-dasharray="4,3"/>')
    for a, b in pts:
        body.append(f'<circle cx="{x0 + s(a) * w:.1f}" cy="{y0 + h - s(b) * h:.1f}" r="2" fill="{COLORS[0]}" '
                    'fill-opacity="0.6"/>')
    return _svg(width, height, body, title)
