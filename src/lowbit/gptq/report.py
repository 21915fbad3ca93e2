"""What ``lb.gptq`` did to each layer: output reconstruction error before and after.

For a layer with GEMM weight ``W`` and calibration inputs ``x_1 .. x_n`` (the inputs it receives
once the earlier layers are quantized), the error of a quantized weight ``W^`` is the mean squared
output error per input vector, ``mean_i ||(W - W^) x_i||^2 = tr(dW S dW^T) / n`` with
``S = sum_i x_i x_i^T``. ``rtn_error`` is that of round to nearest (the layer's own grid),
``gptq_error`` that of GPTQ; ``output_power = mean_i ||W x_i||^2`` scales them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

__all__ = ["LayerReport", "GPTQReport", "output_error"]


_CHUNK = 1 << 23   # elements per row chunk of output_error's temporaries (32 MB of float32)


def output_error(dw: torch.Tensor, hsum: torch.Tensor, n: int) -> float:
    """``tr(dW_g S_g dW_g^T) / n`` summed over GEMM groups; ``dw`` is ``[rows, d]``, ``hsum`` ``[groups, d, d]``."""
    if n == 0:
        return 0.0
    dtype = torch.float64 if torch.float64 in (dw.dtype, hsum.dtype) else torch.float32
    groups, d = hsum.shape[0], dw.shape[1]
    chunks = dw.reshape(groups, -1, d)
    h = hsum.to(dtype)
    step = max(1, _CHUNK // max(d, 1))   # rows at a time: a few temporaries of [step, d], not of [rows, d]
    total = 0.0
    for r in range(0, chunks.shape[1], step):
        c = chunks[:, r:r + step].to(dtype)
        total += float(((c @ h) * c).sum(dtype=torch.float64))
    return total / n


@dataclass(frozen=True)
class LayerReport:
    """One layer: ``rows x columns`` GEMM weight, ``samples`` input vectors seen, errors as above,
    ``damp`` the absolute diagonal damping ``lambda`` added to ``H`` (largest over conv groups)."""

    name: str
    rows: int
    columns: int
    samples: int
    rtn_error: float
    gptq_error: float
    output_power: float
    damp: float
    seconds: float

    @property
    def gain(self) -> float:
        """``rtn_error / gptq_error`` (how many times smaller GPTQ's error is)."""
        return self.rtn_error / self.gptq_error if self.gptq_error > 0 else float("inf")

    @property
    def rtn_relative(self) -> float:
        return self.rtn_error / self.output_power if self.output_power > 0 else 0.0

    @property
    def gptq_relative(self) -> float:
        return self.gptq_error / self.output_power if self.output_power > 0 else 0.0


@dataclass
class GPTQReport:
    """Per-layer results (``layers``, in processing order) and the layers GPTQ did not reach
    (``unreached``: the calibration batches never ran them; they keep round to nearest)."""

    layers: list[LayerReport] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no GPTQ result for layer {name!r}; layers: {[r.name for r in self.layers]}")

    def as_dict(self) -> dict:
        return {"layers": [asdict(r) | {"gain": r.gain} for r in self.layers],
                "unreached": list(self.unreached), "seconds": self.seconds}

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'shape':>11} {'rtn rel err':>11} {'gptq rel err':>12} {'gain':>6}"]
        for r in self.layers:
            lines.append(f"{r.name[-48:]:<48} {f'{r.rows}x{r.columns}':>11} {r.rtn_relative:>11.3e} "
                         f"{r.gptq_relative:>12.3e} {r.gain:>6.2f}")
        if self.unreached:
            lines.append(f"not reached by the calibration batches (round to nearest): {', '.join(self.unreached)}")
        return "\n".join(lines)
