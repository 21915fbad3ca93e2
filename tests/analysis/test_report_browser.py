"""The HTML report as a person sees it: rendered by headless Chromium (Debian's ``chromium``), for
small random-init transformers (GPT-2, Llama).

Oracles: the quantized model's own module tree (which layers are quantized, which hold parameters
and stayed float, and their classes) against the text the browser *renders* (``innerText``, SVG
label text, table cells), and the browser's layout (the page is not wider than the window, no SVG
label is drawn outside its chart). Nothing is compared with lowbit's HTML strings. Skips, with the
reason, where no Chromium is installed.
"""
from __future__ import annotations

import html
import json
import shutil
import subprocess

import pytest
import torch

import lowbit as lb
from _archs import batches, build

pytest.importorskip("transformers")

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless browser: install Debian's chromium package "
                                                        "(apt-get install chromium) to check the rendered report")
WIDTH = 1280

# Measures the rendered page and writes the result into it (the report itself has no script).
_PROBE = """<script>
window.addEventListener('load', () => {
  const r = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
             text: document.body.innerText, clipped: [], charts: {}, rows: [], scrolls: []};
  for (const svg of document.querySelectorAll('svg')) {
    const box = svg.getBoundingClientRect();
    const title = svg.querySelector('title') ? svg.querySelector('title').textContent : '';
    r.charts[title] = [...svg.querySelectorAll('text')].map(t => t.textContent);
    for (const t of svg.querySelectorAll('text')) {
      const c = t.getBoundingClientRect();
      if (c.width > 0 && (c.left < box.left - 1 || c.right > box.right + 1)) r.clipped.push(title + ': ' + t.textContent);
    }
  }
  for (const tr of document.querySelectorAll('tr')) r.rows.push([...tr.children].map(c => c.innerText.trim()));
  for (const d of document.querySelectorAll('div')) {
    if (getComputedStyle(d).overflowX === 'auto') r.scrolls.push([d.scrollWidth, d.clientWidth,
        d.querySelector('tr') ? d.querySelector('tr').innerText.slice(0, 40) : '']);
  }
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _render(path, tmp_path) -> dict:
    page = tmp_path / "probe.html"
    page.write_text(path.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           f"--window-size={WIDTH},1000", "--virtual-time-budget=20000", "--dump-dom", page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    start = out.index('<pre id="probe">') + len('<pre id="probe">')
    return json.loads(html.unescape(out[start:out.index("</pre>", start)]))


def _expected(q: torch.nn.Module):
    """From the module tree: quantized layer names, and the float modules holding parameters with their class."""
    quant = [n for n, m in q.named_modules() if isinstance(m, lb.modules.QuantLayer)]
    inside = {n for n, m in q.named_modules() for c, _ in m.named_modules()
              if isinstance(m, (lb.modules.QuantLayer, lb.modules.QuantEmbedding)) and c
              for n in [f"{n}.{c}"]}
    floats = {n: type(m).__name__ for n, m in q.named_modules()
              if n and n not in inside and not isinstance(m, (lb.modules.QuantLayer, lb.modules.QuantEmbedding))
              and any(True for _ in m.parameters(recurse=False))}
    return quant, floats


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_report_reads_whole_in_a_browser(arch, tmp_path):
    m = build(arch, tied=True)
    b = batches()
    q = lb.recipes.get("w8a8").apply(m, b, freeze=False)
    report = lb.analyze(m, q, b, mdl=False)
    page = _render(report.to_html(tmp_path / "report.html"), tmp_path)
    quant, floats = _expected(q)
    assert quant and floats

    # laid out: the page fits the window, the layer tables fit theirs, no chart label is cut off
    assert page["scrollWidth"] <= page["innerWidth"], "the page is wider than the window"
    assert not page["clipped"], page["clipped"][:5]
    for scroll_width, client_width, head in page["scrolls"]:
        if head.startswith("layer"):
            assert scroll_width <= client_width, f"table {head!r} needs horizontal scrolling at {WIDTH}px"

    # the sensitivity chart names every quantized layer whole (with the common prefix the page states)
    chart = next(labels for title, labels in page["charts"].items() if title.startswith("sensitivity"))
    text = page["text"]
    shown = [lab for lab in chart if any(n.endswith(lab) for n in quant)]
    for n in quant:
        hits = [lab for lab in shown if n.endswith(lab) and (lab == n or n[:-len(lab)] in text)]
        assert hits, f"{n} is not named in the sensitivity chart: {chart}"
        assert len([x for x in quant if x.endswith(max(hits, key=len))]) == 1, f"{n}'s label is ambiguous"

    # every float module holding parameters is a table row: its name, its class, a reason
    rows = {r[0]: r for r in page["rows"] if len(r) >= 3}
    for n, kind in floats.items():
        assert n in rows, f"float module {n} is not listed"
        assert rows[n][1] == kind and len(rows[n][2]) > 10, rows[n]
    assert "{'" not in text, "a raw Python dict is printed"

    # the certified bound: absent, and the page says why (the keyword input) and what would give it
    assert "Certified predictions" in text
    section = text[text.index("Certified predictions"):]
    assert "input_ids" in section.split("\n\n")[0] + section[:600]
