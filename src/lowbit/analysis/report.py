"""``lb.analyze``: every analysis of a quantized model in one :class:`Report`.

``analyze(float_model, q, batches, labels=None)`` runs, on the same inputs:

1. the model-level comparison: accuracy (with labels), top-1 agreement, the exact KL of the
   predictions and its second-order prediction (classifiers), or the output MSE / ``1 - cosine``;
2. the error anatomy of every quantized layer (:mod:`.anatomy`);
3. the per-layer sensitivity (:mod:`.sensitivity`), and with ``budget`` a mixed-precision
   allocation (:mod:`.mixed`);
4. the certified fraction under worst-case rounding beside its first-order limit, and per input
   the layers whose grids cost its certificate most (:mod:`.certify`; tensor inputs only);
5. the description length of the model and, with labels, of the data (:mod:`.mdl`).

The :class:`Report` holds the per-layer table and the model-level numbers; ``to_json()`` and
``to_html(path)`` (a self-contained page with inline SVG plots) write them out.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..checkpoint.atomic import atomic_write
from .anatomy import LayerAnatomy, error_anatomy
from .batches import as_batch_list
from .certify import certify
from .divergence import divergence, kl, kl_predicted, kl_summary
from .mdl import _check_labels, description_length
from .mixed import allocate_bits, apply_bits
from .probe import Probe
from .sensitivity import bit_sensitivity, choose_metric, float_outputs, layer_sensitivity

__all__ = ["Report", "analyze"]

log = logging.getLogger(__name__)

MAX_SCATTER = 500


@dataclass(repr=False)
class Report:
    """The result of :func:`analyze`.

    Attributes:
        model: model-level numbers (``metric``, ``accuracy_float``/``accuracy_quant``/``agreement``
            with labels, ``kl``/``kl_predicted``/``kl_relative_error`` for classifiers, ``divergence``,
            ``certified_fraction`` (worst-case rounding), ``certified_limit`` (the first-order
            worst-case limit a sound certificate can reach) and ``certified_fraction_exact_rounding``
            (``q``'s own rounding), ``bits_per_weight``, ``model_bits``, ``data_bits``, ...).
        layers: the per-layer table, one dict per quantized layer (error anatomy, sensitivity, bits).
        anatomy: per-layer :class:`LayerAnatomy` (clip sweeps and histograms for the plots).
        kl_points: ``{"exact": [...], "predicted": [...]}`` per-sample KL (a sample, for the scatter).
        bound / mdl / sensitivity / mixed: the sub-results as dicts (``mixed`` None without a budget).
        notes: what was skipped and why.
        coverage: the layers ``q`` left float, each with its kind and reason (``float``: rows
            ``{layer, kind, reason, linear_like}``), and its ``tied``/``untied``/``aliases`` (from
            ``lb.coverage(q)``); None if ``q`` carries no coverage report.
        bound_unavailable: when there is no certified bound, ``{"why": ..., "remedy": ...}``: what
            stopped it and what would make it available.
    """

    model: dict[str, Any]
    layers: list[dict[str, Any]]
    anatomy: dict[str, LayerAnatomy] = field(default_factory=dict)
    kl_points: dict[str, list[float]] = field(default_factory=dict)
    bound: dict[str, Any] | None = None
    mdl: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None
    mixed: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    coverage: dict[str, Any] | None = None
    bound_unavailable: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return _clean({"model": self.model, "layers": self.layers,
                       "anatomy": {k: asdict(v) for k, v in self.anatomy.items()}, "kl_points": self.kl_points,
                       "bound": self.bound, "mdl": self.mdl, "sensitivity": self.sensitivity, "mixed": self.mixed,
                       "timings": self.timings, "notes": self.notes, "coverage": self.coverage,
                       "bound_unavailable": self.bound_unavailable})

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """The report as JSON text (strict JSON: non-finite numbers become null); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    def to_html(self, path: str | os.PathLike) -> Path:
        """Write a self-contained ``report.html`` (inline SVG plots, no scripts, no network); returns the path."""
        from .html import render
        path = Path(path)
        _atomic_write(path, render(self))
        return path

    def table(self) -> list[dict[str, Any]]:
        """The per-layer table with a few columns, for printing."""
        return [{k: r.get(k) for k in _TABLE_KEYS} for r in self.layers]

    def summary(self) -> str:
        """A plain-text summary: the model-level numbers, then :meth:`table` (also ``str(report)``)."""
        m = self.model
        lines = [f"lowbit report: {m.get('layers', len(self.layers))} quantized layers, "
                 f"{m.get('weights', 0):,} weights, {m.get('samples', 0):,} samples, metric {m.get('metric')}"]
        if m.get("accuracy_float") is not None:
            lines.append(f"accuracy {m['accuracy_float']:.2%} -> {m['accuracy_quant']:.2%} "
                         f"(top-1 agreement {m['agreement']:.2%})")
        if m.get("kl") is not None:
            line = f"KL(float || quantized) {m['kl']:.3g}"
            if m.get("kl_predicted") is not None:
                line += f", predicted 1/2 Var_p[dz] {m['kl_predicted']:.3g} ({_fmt(m.get('kl_relative_error'), '.1%')} off)"
            lines.append(line)
        elif m.get("divergence") is not None:
            lines.append(f"divergence ({m.get('metric')}) {m['divergence']:.3g}")
        if m.get("certified_fraction") is not None:
            lines.append(f"certified unchanged: {m['certified_fraction']:.1%} under worst-case rounding (first-order "
                         f"limit {_fmt(m.get('certified_limit'), '.1%')}), "
                         f"{_fmt(m.get('certified_fraction_exact_rounding'), '.1%')} under this model's rounding")
            if self.bound and self.bound.get("sources"):
                top = list(self.bound["sources"].items())[:3]
                lines.append("  share of the bounds: " + ", ".join(f"{k} {v:.0%}" for k, v in top))
        if m.get("bits_per_weight") is not None:
            lines.append(f"description length: {m['bits_per_weight']:.2f} bits per weight entropy-coded "
                         f"(stored {_fmt(m.get('stored_bits_per_weight'), '.2f')})")
        rows = [[_fmt(r.get(k), f) for k, f in zip(_TABLE_KEYS, _TABLE_FORMATS)] for r in self.layers]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(_TABLE_HEADS)]
        lines.append("")
        lines.append("  ".join(h.ljust(w) for h, w in zip(_TABLE_HEADS, widths)).rstrip())
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        m = self.model
        return (f"Report(layers={len(self.layers)}, metric={m.get('metric')!r}, "
                f"divergence={_fmt(m.get('divergence'), '.3g')}; print() it for the summary)")


_TABLE_KEYS = ("layer", "bits", "weights", "weight_sqnr_db", "weight_clip_share", "input_sqnr_db",
               "input_clip_share", "sensitivity", "rank")
_TABLE_HEADS = ("layer", "bits", "weights", "w SQNR dB", "w clip share", "in SQNR dB", "in clip share",
                "sensitivity", "rank")
_TABLE_FORMATS = ("", "", ",", ".1f", ".2f", ".1f", ".2f", ".3g", "")


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and abs(v) >= 1e9:   # infinite (JSON keeps such values as +-1e9)
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _clean(v.tolist())
    return v


def _atomic_write(path: Path, text: str) -> None:
    """The report's file, atomically (:func:`lowbit.checkpoint.atomic.atomic_write`); the folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"))


def _labels(labels: Any) -> torch.Tensor | None:
    if labels is None:
        return None
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], torch.Tensor):
        labels = torch.cat([t.reshape(-1) for t in labels])
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor of class indices (or a list of them, one per batch); "
                        f"got {type(labels).__name__}")
    return labels


def _share(err: dict) -> float:
    return err["clip_mse"] / err["mse"] if err["mse"] > 0 else 0.0


def _layer_rows(anat: dict[str, LayerAnatomy], probe: Probe, sens, codes: dict) -> list[dict]:
    rows = []
    for name in probe.names:
        layer = probe.layers[name]
        a = anat[name]
        row = {"layer": name, "kind": type(layer).__name__, "weights": int(probe.w_float[name].numel()),
               "bits": layer.weight_quant.spec.bits, "weight_spec": a.weight.spec,
               "input_spec": a.input.spec if a.input is not None else None}
        for prefix, t in (("weight", a.weight), ("input", a.input)):
            if t is None:
                continue
            row.update({f"{prefix}_{k}": v for k, v in t.error.items()})
            row[f"{prefix}_clip_share"] = _share(t.error)
            row[f"{prefix}_chosen_ratio"] = t.chosen_ratio
            row[f"{prefix}_best_ratio"] = t.best_ratio
        if a.weight.mse_used is not None:
            row["weight_mse_used"] = a.weight.mse_used
        if sens is not None:
            row["sensitivity"] = sens.layers[name]
            row["rank"] = sens.ranking.index(name) + 1
        if name in codes:
            row["entropy_bits_per_weight"] = codes[name]
        row["notes"] = list(a.notes)
        rows.append(row)
    return rows


def _accuracy(z: torch.Tensor, labels: torch.Tensor) -> float:
    return float((z.argmax(-1).cpu() == labels.cpu()).double().mean())


@torch.no_grad()
def analyze(float_model: nn.Module, qmodel: nn.Module, batches: Iterable, labels: Any = None, *,
            metric: str = "auto", budget: float | None = None, candidates: Sequence[int] = (2, 3, 4, 6, 8),
            bound: bool = True, mdl: bool = True, sensitivity: bool = True, refine: int | bool = False) -> Report:
    """Analyse ``qmodel`` (from ``lb.quantize``, calibrated, frozen or not) against ``float_model``.

    Args:
        batches: model inputs (tensors, tuples of args or dicts of kwargs), e.g. a test set in batches.
        labels: class indices for all samples of ``batches`` (a tensor, or one tensor per batch).
        metric: ``"kl"`` for logits, ``"mse"`` / ``"cosine"`` for other outputs; ``"auto"``: KL with
            labels, otherwise cosine (vector outputs) or MSE (scalar outputs).
        budget: average bits per weight for a mixed-precision allocation over ``candidates``.
        bound / mdl / sensitivity: switch the costlier parts off.
        refine: for the certified bound (:func:`~.certify.certify`): how many unstable neurons per
            input and node to tighten by backward passes (True: all; False: none, fast and loose).
    """
    batches = as_batch_list(batches)
    labels = _labels(labels)
    timings: dict[str, float] = {}
    notes: list[str] = []
    t = time.perf_counter()
    probe = Probe(float_model, qmodel)
    z_f = float_outputs(float_model, batches)
    z_q = float_outputs(qmodel, batches)
    metric = choose_metric(metric, labels is not None, z_f)
    model: dict[str, Any] = {"metric": metric, "samples": int(z_f.shape[0]), "layers": len(probe.names),
                             "weights": int(sum(w.numel() for w in probe.w_float.values()))}
    info = getattr(qmodel, "lowbit_info", None)
    if info is not None:
        model["quantization"] = info.as_dict()
    if labels is not None:
        labels = _check_labels(labels, z_f)
        model.update(accuracy_float=_accuracy(z_f, labels), accuracy_quant=_accuracy(z_q, labels))
    if z_f.dim() >= 2 and z_f.shape[-1] > 1 and metric == "kl":
        model["agreement"] = float((z_f.argmax(-1) == z_q.argmax(-1)).double().mean())
    model["divergence"] = float(divergence(z_f, z_q, metric).mean())
    kl_points: dict[str, list[float]] = {}
    if metric == "kl":
        s = kl_summary(z_f, z_q)
        model.update(kl=s.kl, kl_predicted=s.kl_predicted, kl_relative_error=s.relative_error,
                     kl_median_sample_relative_error=s.median_sample_relative_error)
        step = max(1, z_f.shape[0] // MAX_SCATTER)
        kl_points = {"exact": kl(z_f[::step], z_q[::step]).reshape(-1).tolist(),
                     "predicted": kl_predicted(z_f[::step], z_q[::step]).reshape(-1).tolist()}
    timings["outputs"] = time.perf_counter() - t

    t = time.perf_counter()
    anat = error_anatomy(float_model, qmodel, batches)
    timings["anatomy"] = time.perf_counter() - t

    sens = None
    if sensitivity:
        t = time.perf_counter()
        sens = layer_sensitivity(float_model, qmodel, batches, metric, probe=probe, reference=z_f)
        model["sensitivity_sum"] = sum(sens.layers.values())
        model["sensitivity_additivity"] = sens.additivity
        timings["sensitivity"] = time.perf_counter() - t

    mixed = None
    if budget is not None:
        t = time.perf_counter()
        mixed = _mixed(float_model, qmodel, batches, labels, metric, budget, candidates, probe, z_f, model)
        timings["mixed_precision"] = time.perf_counter() - t

    bound_d, unavailable = None, None
    if bound:
        t = time.perf_counter()
        if not all(isinstance(b, torch.Tensor) for b in batches):
            unavailable = {"why": f"the model is called with {_input_kind(batches[0])}, not one input tensor",
                           "remedy": _BOUND_DOMAIN + _NO_TRANSFORMER}
        elif z_f.dim() != 2 or z_f.shape[1] < 2:
            unavailable = {"why": f"the model's outputs have shape {list(z_f.shape)[1:]} per input, not classifier "
                                  "logits [N, C]",
                           "remedy": _BOUND_DOMAIN + " Embedding models and per-token outputs get none."}
        else:
            x = torch.cat(batches)
            res = certify(float_model, qmodel, x, refine=refine)
            bound_d = res.as_dict()
            model["bound_available"] = res.available
            model["certified_fraction"] = res.certified_fraction if res.available else None
            model["certified_limit"] = res.limit_fraction
            model["certified_ratio_to_limit"] = bound_d["ratio_to_limit"] if res.available else None
            if res.available:
                exact = certify(float_model, qmodel, x, rounding="exact", refine=False, limit=False)
                bound_d["exact_rounding"] = {k: v for k, v in exact.as_dict().items()
                                             if k not in ("sources", "per_input", "limit_fraction", "ratio_to_limit")}
                model["certified_fraction_exact_rounding"] = exact.certified_fraction
            else:
                unavailable = {"why": "no bound rule for: " + "; ".join(res.unsupported),
                               "remedy": _BOUND_DOMAIN + " Replace the named operations (e.g. GELU by ReLU) or read "
                                         "the error anatomy and sensitivity instead."}
        if unavailable is not None:
            notes.append(f"certified bound unavailable: {unavailable['why']}")
        timings["bound"] = time.perf_counter() - t

    mdl_d, codes = None, {}
    if mdl:
        t = time.perf_counter()
        dl = description_length(qmodel, batches if labels is not None else None, labels)
        mdl_d = dl.as_dict()
        codes = {c.name: c.entropy_per_weight for c in dl.layers}
        model.update(bits_per_weight=dl.bits_per_weight, stored_bits_per_weight=dl.stored_bits_per_weight,
                     model_bits=dl.model_bits, data_bits=dl.data_bits, total_bits=dl.total_bits)
        timings["mdl"] = time.perf_counter() - t

    rows = _layer_rows(anat, probe, sens, codes)
    if mixed is not None:
        for r in rows:
            r["suggested_bits"] = mixed["bits"][r["layer"]]
    timings["total"] = sum(timings.values())
    return Report(model=model, layers=rows, anatomy=anat, kl_points=kl_points, bound=bound_d, mdl=mdl_d,
                  sensitivity=None if sens is None else sens.as_dict(), mixed=mixed, timings=timings, notes=notes,
                  coverage=_coverage(qmodel), bound_unavailable=unavailable)


_BOUND_DOMAIN = ("The certificate covers a model called on one input tensor that returns classifier logits [N, C], "
                 "built of operations with a bound rule: Linear/Conv layers, BatchNorm, ReLU-like and monotone "
                 "activations, pooling, concatenation and elementwise arithmetic.")
_NO_TRANSFORMER = (" Transformer blocks (embedding lookups, attention and softmax, LayerNorm, GELU) have no bound rule "
                   "yet, so a transformer gets no certificate in this version; pass test inputs as tensors to a model "
                   "of the kind above to get one.")


def _input_kind(batch: Any, top: bool = True) -> str:
    """How a batch calls the model, in words: ``keyword inputs (input_ids)``, ``a dict (...)``, ..."""
    if isinstance(batch, dict):
        return ("keyword inputs (" if top else "a dict (") + ", ".join(map(str, batch)) + ")"
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return "one positional argument, " + _input_kind(batch[0], top=False)
        return f"{len(batch)} positional arguments"
    return f"a {type(batch).__name__}"


def _coverage(qmodel: nn.Module) -> dict[str, Any] | None:
    """The float layers of ``qmodel`` with kind and reason, and its ties (from ``lb.coverage``)."""
    cov = getattr(qmodel, "lowbit_coverage", None)
    if cov is None:
        return None
    modules = dict(qmodel.named_modules())
    rows = [{"layer": n, "kind": type(modules[n]).__name__ if n in modules else None, "reason": why,
             "linear_like": n in cov.linear_like_float} for n, why in cov.float.items()]
    return {"quantized": len(cov.quantized), "float": rows, "tied": [list(g) for g in cov.tied],
            "untied": dict(cov.untied), "aliases": dict(cov.aliases)}


def _mixed(float_model, qmodel, batches, labels, metric, budget, candidates, probe, z_f, model) -> dict:
    table = bit_sensitivity(float_model, qmodel, batches, candidates, metric, probe=probe, reference=z_f)
    sizes = {n: int(w.numel()) for n, w in probe.w_float.items()}
    plan = allocate_bits(table, sizes, budget)
    out = plan.as_dict()
    out["candidates"] = {n: {str(b): v for b, v in d.items()} for n, d in table.items()}
    if not any(l.frozen for l in probe.layers.values()):
        mixed_q = apply_bits(qmodel, plan.bits)
        z_m = float_outputs(mixed_q, batches)
        out["divergence"] = float(divergence(z_f, z_m, metric).mean())
        if labels is not None:
            out["accuracy"] = _accuracy(z_m, labels)
        uniform = int(round(budget))
        if uniform in candidates and abs(uniform - budget) < 1e-9:
            z_u = float_outputs(apply_bits(qmodel, {n: uniform for n in probe.names}), batches)
            out["uniform_divergence"] = float(divergence(z_f, z_u, metric).mean())
            if labels is not None:
                out["uniform_accuracy"] = _accuracy(z_u, labels)
    else:
        out["note"] = "q is frozen: the allocation is a suggestion; apply it with apply_bits before lb.freeze"
    return out
