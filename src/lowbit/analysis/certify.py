"""Certified predictions from bounds on the logit *differences* (differential verification).

``certify(float_model, q, x)`` bounds, for every input and class ``k``, how far quantization can
move the difference ``z_t - z_k`` of the float model's top-1 class ``t`` and ``k``::

    lower_k <= (z_q,t - z_q,k) - (z_float,t - z_float,k) <= upper_k

for *every* admissible rounding: ``rounding="worst"`` lets each activation rounding fall
anywhere within half a step of its input (clipping at the grid's ends exact), so the certificate
holds for any integer kernel of the same grids, whatever its tie-breaking; ``rounding="exact"``
encloses ``q``'s own computation. The input is *certified* when ``z_float,t - z_float,k + lower_k >
0`` for every ``k != t``: the quantized model then provably predicts ``t``.

The difference of the float and the quantized network is propagated through the graph
(:mod:`.bound_walk`): each quantizer adds a bounded error variable, layers are linear maps of the
errors (the weight error ``dW a`` exact), ReLU/ReLU6, max pooling and clipping get linear
relaxations given the quantized network's pre-activation intervals around the (known) float
activations, and the intervals of unstable neurons are refined by backward passes (ReluDiff,
Paulsen et al., ICSE 2020; NeuroDiff, Paulsen et al., ASE 2020; CROWN, Zhang et al., NeurIPS 2018).
The objective ``e_t - e_k`` is composed back through the network before any absolute value is
taken, so errors common to both logits cancel. Beside the certificate, :func:`.limit.first_order_limit`
gives the fraction a sound certificate could reach at best, and the per-node shares of each
input's bound say which layers' grids cost the certificate most.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..modules import ActQuantizer, QuantLayer
from .batches import output_tensor
from .bound_rules import ROUNDING
from .bound_walk import CHUNK_ELEMENTS, Tracer, Walk
from .attack import RoundingAttack, rounding_attack
from .limit import FirstOrderLimit, first_order_limit
from .probe import weight_pairs

__all__ = ["Certificate", "certify"]

WALK_INPUTS = 200          # inputs per walk (the walk keeps a few tensors per node and input)
REFINE = 1 << 20           # default (True): every unstable element, per input and node
RELAXATIONS = "relaxations"
REACH = 8.0                # refine only inputs whose fast bound is within this factor of their margin


@dataclass
class Certificate:
    """Bounds on the change of every logit difference ``z_t - z_k`` and what they certify.

    Attributes:
        top: ``[N]`` the float model's top-1 class ``t``.
        margin: ``[N, C]`` float ``z_t - z_k`` (``+inf`` at ``k = t``).
        lower / upper: ``[N, C]`` bounds on the change of ``z_t - z_k`` (0 at ``k = t``).
        measured: ``[N, C]`` the change ``q`` itself makes (within ``[lower, upper]``).
        certified: ``[N]`` ``margin + lower > 0`` for every ``k != t``.
        limit: the first-order worst-case limit (:class:`~.limit.FirstOrderLimit`), or None.
        attack: the adversarial-rounding search (:class:`~.attack.RoundingAttack`), or None: the
            inputs it falsifies cannot be certified by any sound bound (``attack.ceiling``).
        sources: names of the graph nodes whose terms make up the bounds (quantized layers,
            activation quantizers, and ``"relaxations"``: ReLU, pooling, roundoff).
        contributions: ``[N, len(sources)]`` each source's share of the binding lower bound of
            each input (the class ``k`` closest to flipping).
        unsupported: the nodes that made the bound unavailable (then ``lower = -inf``).
    """

    top: torch.Tensor
    margin: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    measured: torch.Tensor
    certified: torch.Tensor
    rounding: str = "worst"
    limit: FirstOrderLimit | None = None
    attack: RoundingAttack | None = None
    sources: list[str] = field(default_factory=list)
    contributions: torch.Tensor | None = None
    unsupported: list[str] = field(default_factory=list)
    refined: int = 0

    @property
    def available(self) -> bool:
        return not self.unsupported

    @property
    def certified_fraction(self) -> float:
        return float(self.certified.double().mean()) if self.certified.numel() else 0.0

    @property
    def limit_fraction(self) -> float | None:
        return None if self.limit is None else self.limit.fraction

    @property
    def ceiling_fraction(self) -> float | None:
        """The fraction the adversarial-rounding search leaves unfalsified (an upper limit), or None."""
        return None if self.attack is None else self.attack.ceiling

    @property
    def bound(self) -> torch.Tensor:
        """``[N]``: ``max_k max(upper_k, -lower_k)``, the largest change of a difference."""
        return torch.maximum(self.upper, -self.lower).amax(1)

    def top_sources(self, i: int, count: int = 3) -> list[tuple[str, float]]:
        """The ``count`` sources contributing most to input ``i``'s bound, with their shares."""
        if self.contributions is None:
            return []
        c = self.contributions[i]
        order = c.argsort(descending=True)[:count]
        return [(self.sources[j], float(c[j])) for j in order.tolist()]

    def as_dict(self, per_input: int = 20) -> dict:
        """Summary numbers, and for the first ``per_input`` inputs their largest contributors."""
        n = int(self.certified.numel())
        ok = torch.isfinite(self.lower).all(1)
        viol = int(((self.measured > self.upper + 1e-12) | (self.measured < self.lower - 1e-12)).any(1).sum())
        mask = torch.ones_like(self.lower, dtype=torch.bool).scatter_(1, self.top.reshape(-1, 1), False)
        width = (-self.lower)[mask & ok.unsqueeze(1)]
        meas = self.measured.abs()[mask]
        out = {"available": self.available, "unsupported": list(self.unsupported), "inputs": n,
               "rounding": self.rounding, "certified_fraction": self.certified_fraction,
               "limit_fraction": self.limit_fraction,
               "ratio_to_limit": (self.certified_fraction / self.limit_fraction
                                  if self.limit_fraction else None),
               "lower_bound_median": float(width.median()) if width.numel() else float("nan"),
               "measured_change_median": float(meas.median()) if meas.numel() else float("nan"),
               "violations": viol, "refined_neurons": self.refined}
        if self.attack is not None:
            out["ceiling_fraction"] = self.attack.ceiling
            # self-checks of soundness: the attacked change lies inside the bounds, and nothing
            # certified is falsified (both must be 0)
            found = (self.attack.worst - self.margin)[mask & torch.isfinite(self.attack.worst)]
            low = self.lower[mask & torch.isfinite(self.attack.worst)]
            out["attack_below_bound"] = int((found < low - 1e-9 * (1 + low.abs())).sum())
            out["certified_but_falsified"] = int((self.certified & self.attack.falsified).sum())
        if self.limit is not None:
            ch = self.limit.change[mask]
            out["limit_change_median"] = float(ch.median()) if ch.numel() else float("nan")
        if self.contributions is not None and n:
            share = self.contributions.clamp_min(0)
            share = share / share.sum(1, keepdim=True).clamp_min(1e-300)
            mean = share.mean(0)
            out["sources"] = {s: float(v) for s, v in sorted(zip(self.sources, mean.tolist()), key=lambda t: -t[1])}
            out["per_input"] = [{"input": i, "certified": bool(self.certified[i]),
                                 "top_sources": [[s, v] for s, v in self.top_sources(i)]} for i in range(min(n, per_input))]
        return out


def _source(node, q: nn.Module) -> str:
    if node.op == "call_module":
        m = q.get_submodule(node.target)
        if isinstance(m, (QuantLayer, ActQuantizer)):
            return str(node.target)
    return RELAXATIONS


@torch.no_grad()
def certify(float_model: nn.Module, q: nn.Module, x: torch.Tensor, rounding: str = "worst", refine: int | bool = True,
            limit: bool = True, attack: int = 0) -> Certificate:
    """Bound the change of every logit difference ``z_t - z_k`` under quantization; certify inputs.

    Args:
        float_model, q: the float model and its quantized version (``lb.quantize``), evaluated in eval mode.
        x: one batch ``[N, ...]`` (a classifier's logits ``[N, C]`` out).
        rounding: ``"worst"`` (any rounding within half a step: any integer kernel of the same
            grids) or ``"exact"`` (``q``'s own rounding).
        refine: tighten the intervals of unstable neurons by backward passes before relaxing them:
            at most this many per input and node (True: all of them; False or 0: none). Each costs
            a backward pass through the layers before it; more is slower and tighter. Only the
            inputs a first, unrefined pass leaves undecided are refined, and of those only the
            ones within reach: whose fast bound is at most ``REACH`` (8) times their margin
            (refinement shrinks the bound 3-5x on the built-in CNNs), that (with ``limit``) the
            first-order limit says can be certified, and (with ``attack``) that the search does
            not falsify. Skipping an input never makes a certificate wrong, only rarer.
        limit: also compute the first-order worst-case limit (:func:`.limit.first_order_limit`).
        attack: steps of the adversarial-rounding search (:func:`.attack.rounding_attack`; 0:
            none), for ``rounding="worst"``: an upper limit on the certified fraction, and inputs
            it falsifies are not refined.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor batch [N, ...]; certify takes a single input tensor")
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
    if isinstance(attack, bool) or not isinstance(attack, int) or attack < 0:
        raise ValueError(f"attack must be a number of search steps >= 0, got {attack!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        if not isinstance(refine, bool):
            raise ValueError(f"refine must be True, False or a number of elements >= 0, got {refine!r}")
        refine = REFINE if refine else 0
    pairs = weight_pairs(float_model, q)
    modes = [(m, m.training) for m in (float_model, q)]
    float_model.eval()
    q.eval()
    try:
        z_f = output_tensor(float_model(x)).double()
        z_q = output_tensor(q(x)).double()
        if z_f.dim() != 2 or z_f.shape[1] < 2:
            raise ValueError(f"certify needs a classifier's logits [N, C] with C >= 2; the model returns "
                             f"{tuple(z_f.shape)} (use logit_bound for other outputs)")
        n, c = z_f.shape
        top = z_f.argmax(1)
        margin = z_f.gather(1, top.reshape(-1, 1)) - z_f
        measured = (z_q.gather(1, top.reshape(-1, 1)) - z_q) - margin
        lower, upper, sources, contrib, unsupported, refined = _bound(q, pairs, x, z_f, top, rounding, 0)
        uniform = all(m.spec.number_format.integer_grid for m in q.modules() if isinstance(m, ActQuantizer))
        lim = first_order_limit(q, x, top) if limit and uniform else None   # the limit models integer grids
        att = rounding_attack(q, x, top, steps=attack) if attack and rounding == "worst" and uniform else None
        if refine and not unsupported:
            # refine the inputs the fast pass leaves undecided, within reach (and that the limit
            # says can be certified and the search does not falsify)
            gap = margin.scatter(1, top.reshape(-1, 1), torch.inf)
            certified0 = ((gap + lower) > 0).all(1)
            todo = ~certified0 & (-lower <= REACH * gap).all(1)
            if lim is not None:
                todo &= lim.certifiable
            if att is not None:
                todo &= ~att.falsified
            if bool(todo.any()):
                idx = todo.nonzero().squeeze(1)
                lo2, up2, src2, con2, uns2, refined = _bound(q, pairs, x[idx], z_f[idx], top[idx], rounding, refine)
                if not uns2:
                    lower[idx], upper[idx] = torch.maximum(lower[idx], lo2), torch.minimum(upper[idx], up2)
                    contrib = _merge(sources, contrib, src2, con2, idx)
                    sources = list(dict.fromkeys(sources + src2))
    finally:
        for m, was in modes:
            m.train(was)
    margin = margin.scatter(1, top.reshape(-1, 1), torch.inf)
    certified = ((margin + lower) > 0).all(1) if not unsupported else torch.zeros(n, dtype=torch.bool)
    return Certificate(top=top, margin=margin, lower=lower, upper=upper, measured=measured, certified=certified,
                       rounding=rounding, limit=lim, attack=att, sources=sources, contributions=contrib,
                       unsupported=unsupported, refined=refined)


def _merge(sources, contrib, src2, con2, idx):
    """The contributions table over the union of the sources, rows ``idx`` from the refined pass."""
    names = list(dict.fromkeys(sources + src2))
    out = torch.zeros(contrib.shape[0], len(names), dtype=contrib.dtype, device=contrib.device)
    out[:, [names.index(s) for s in sources]] = contrib
    rows = torch.zeros(len(idx), len(names), dtype=contrib.dtype, device=contrib.device)
    rows[:, [names.index(s) for s in src2]] = con2
    out[idx] = rows
    return out


def _bound(q, pairs, x, z_f, top, rounding, refine):
    n, c = z_f.shape
    inf = torch.full((n, c), torch.inf, dtype=torch.float64, device=x.device)
    try:
        graph = Tracer().trace(q)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "unsupported", named
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return -inf, inf, [], None, [f"{type(q).__name__}: torch.fx cannot trace it ({first}); models with "
                                     "data-dependent control flow are not supported"], 0
    per = max(1, min(n, WALK_INPUTS, CHUNK_ELEMENTS // (2 * c * max(1, x[0].numel()) * 64)))
    lowers, uppers, records, refined = [], [], [], 0
    names: dict[str, int] = {}
    for i in range(0, n, per):
        walk = Walk(q, graph, pairs, x[i:i + per], rounding, refine)
        out = walk.run()
        if out is None:
            return -inf, inf, [], None, list(dict.fromkeys(walk.unsupported)), 0
        zf, t = z_f[i:i + per], top[i:i + per]
        if out.a.shape != zf.shape:
            return -inf, inf, [], None, [f"output: traced shape {tuple(out.a.shape)} differs from the model's "
                                         f"{tuple(zf.shape)}"], 0
        m = zf.shape[0]
        # objectives e_t - e_k (upper bounds) and e_k - e_t (minus lower bounds) on d = z_q - a
        onehot = torch.zeros(m, c, dtype=torch.float64, device=x.device).scatter_(1, t.reshape(-1, 1), 1.0)
        eye = torch.eye(c, dtype=torch.float64, device=x.device)
        lam = onehot.unsqueeze(0) - eye.unsqueeze(1)                                      # [C, m, C]
        rec: dict = {}
        tot = walk.backward_from(walk.out_node, torch.cat([lam, -lam]), rec)             # [2C, m]
        up_b, lo_b = tot[:c].t(), -tot[c:].t()
        # the interval bound on d_t - d_k, intersected
        lo_i = out.l().gather(1, t.reshape(-1, 1)) - out.h()
        hi_i = out.h().gather(1, t.reshape(-1, 1)) - out.l()
        up_d, lo_d = torch.minimum(up_b, hi_i), torch.maximum(lo_b, lo_i)
        # from d (against the float64 folded model a) to the change against the float model's own output
        gap = (out.a.gather(1, t.reshape(-1, 1)) - out.a) - (zf.gather(1, t.reshape(-1, 1)) - zf)
        tiny = 1e-12 * (out.a.abs().amax(1, keepdim=True) + zf.abs().amax(1, keepdim=True))
        up, lo = up_d + gap + tiny, lo_d + gap - tiny
        lo = lo.scatter(1, t.reshape(-1, 1), 0.0)
        up = up.scatter(1, t.reshape(-1, 1), 0.0)
        lowers.append(lo)
        uppers.append(up)
        # each node's share of the binding (closest to flipping) lower bound
        slack = ((zf.gather(1, t.reshape(-1, 1)) - zf) + lo).scatter(1, t.reshape(-1, 1), torch.inf)
        k = slack.argmin(1)
        shares = {}
        for node, terms in rec.items():
            name = _source(node, q)
            names.setdefault(name, len(names))
            val = terms[c:].gather(0, k.reshape(1, -1)).squeeze(0)
            shares[name] = shares.get(name, 0) + val
        records.append(shares)
        refined += walk.refined
    sources = list(names)
    contrib = torch.zeros(n, len(sources), dtype=torch.float64, device=x.device)
    row = 0
    for shares in records:
        m = next(iter(shares.values())).shape[0] if shares else 0
        for name, v in shares.items():
            contrib[row:row + m, names[name]] = v
        row += m
    return torch.cat(lowers), torch.cat(uppers), sources, contrib, [], refined
