"""Each transform, measured: accuracy with and without it, side by side, for W8A8 and W4A8.

    python benchmarks/bench_transforms.py [--seeds 3] [--json]

Model and data: a small BatchNorm CNN trained here on scikit-learn's ``digits`` (8x8 images, fixed
80/20 split), once per seed and once more per seed with bounded ReLUs (``load_task(seed, bound)``
returns a trained float model in eval mode, calibration batches and ``(x_test, y_test)``): the
averages over seeds and the bound-trained column need fresh training, which ``lowbit.zoo``'s one
cached model per data set does not give. Rows are recipes (per-tensor and per-channel weights; activations unsigned
8-bit, min/max calibration). Columns are transform pipelines run by
``lowbit.transforms.quantize_with``: cle = ``equalize``, bc = ``bias_correction`` (mode layer or
model), bound6-trained = the same CNN trained with its ReLUs bounded at 6 (``bound_activations``
before training), quantized without further transforms. Each cell is test accuracy (%) and, in
brackets, the SQNR (dB) of the quantized logits against its own float model's logits on the test
set, averaged over ``--seeds`` trained models.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from torch import nn

import lowbit as lb
from lowbit.transforms import activation_clipping, bound_activations, quantize_with

A8 = lb.QuantSpec(bits=8, symmetric=False)
RECIPES = {
    "W8A8 per-tensor": dict(weights=lb.QuantSpec(bits=8), activations=A8),
    "W8A8 per-channel": dict(weights=lb.QuantSpec(bits=8, granularity=lb.PerChannel(0)), activations=A8),
    "W4A8 per-tensor": dict(weights=lb.QuantSpec(bits=4), activations=A8),
    "W4A8 per-channel": dict(weights=lb.QuantSpec(bits=4, granularity=lb.PerChannel(0)), activations=A8),
}
BC_LAYER = ("bias_correction", {"mode": "layer"})
BC_MODEL = ("bias_correction", {"mode": "model"})
# column -> (float model: "plain" or "bound6" = trained with ReLUs bounded at 6, transform pipeline)
PIPELINES = {
    "none": ("plain", []),
    "cle": ("plain", ["equalize"]),
    "bc(layer)": ("plain", [BC_LAYER]),
    "bc(model)": ("plain", [BC_MODEL]),
    "cle+bc(model)": ("plain", ["equalize", BC_MODEL]),
    "bound6-trained": ("bound6", []),
    "bound6-t+cle+bc": ("bound6", ["equalize", BC_MODEL]),
}


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def load_task(seed: int, bound: float | None = None):
    """A trained float model, calibration batches, and (x_test, y_test).

    With ``bound``, the model is trained with its ReLUs bounded at ``bound`` from the start
    (``bound_activations`` applied before training: the co-design use of the transform).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))   # fixed split
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    torch.manual_seed(seed)
    model = _digits_cnn()
    if bound is not None:
        model = bound_activations(model, bound)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):
        model.train()
        for idx in tr[torch.randperm(len(tr), generator=g)].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    calib = [x[idx] for idx in tr[:512].split(64)]      # 512 training images, 8 batches
    return model, calib, (x[te], y[te])


@torch.no_grad()
def evaluate(model: nn.Module, test, ref_logits: torch.Tensor | None = None) -> tuple[float, float]:
    x, y = test
    logits = model(x)
    acc = 100.0 * float((logits.argmax(1) == y).float().mean())
    if ref_logits is None:
        return acc, math.inf
    err = (logits - ref_logits).pow(2).sum()
    return acc, float(10 * torch.log10(ref_logits.pow(2).sum() / err)) if err > 0 else math.inf


def run(seeds: int) -> dict:
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    floats, clipped, seconds = {"plain": [], "bound6": [], "bound6 post-hoc": []}, [], {}
    for seed in range(seeds):
        models = {}
        for kind, bound in (("plain", None), ("bound6", 6.0)):
            model, calib, test = load_task(seed, bound)
            with torch.no_grad():
                models[kind] = (model, model(test[0]))
            floats[kind].append(evaluate(model, test)[0])
        plain = models["plain"][0]
        stats = activation_clipping(plain, calib, limit=6.0)
        clipped.append(sum(s.clipped for s in stats.values()) / sum(s.total for s in stats.values()))
        floats["bound6 post-hoc"].append(evaluate(bound_activations(plain, 6.0), test)[0])
        for pname, (kind, pipeline) in PIPELINES.items():
            model, ref = models[kind]
            for rname, recipe in RECIPES.items():
                t = time.perf_counter()
                q = quantize_with(model, calib, transforms=pipeline, **recipe)
                seconds[pname] = seconds.get(pname, 0.0) + time.perf_counter() - t
                cells.setdefault((rname, pname), []).append(evaluate(q, test, ref))
    mean = lambda v: sum(v) / len(v)   # noqa: E731
    return {
        "task": "digits CNN (trained here)", "seeds": seeds,
        "float_accuracy": mean(floats["plain"]), "float_accuracy_bound6_trained": mean(floats["bound6"]),
        "float_accuracy_bound6_post_hoc": mean(floats["bound6 post-hoc"]),
        "clipped_fraction_at_6": mean(clipped),
        "seconds_per_pipeline": {k: v / (seeds * len(RECIPES)) for k, v in seconds.items()},
        "results": [{"recipe": r, "pipeline": p, "accuracy": mean([a for a, _ in cells[(r, p)]]),
                     "logit_sqnr_db": mean([s for _, s in cells[(r, p)]])}
                    for r in RECIPES for p in PIPELINES],
    }


def print_table(res: dict) -> None:
    print(f"{res['task']}, {res['seeds']} seeds: float accuracy {res['float_accuracy']:.2f}%; trained with ReLUs "
          f"bounded at 6: {res['float_accuracy_bound6_trained']:.2f}%; plain model bounded at 6 afterwards (no "
          f"fine-tuning): {res['float_accuracy_bound6_post_hoc']:.2f}%, the bound clips "
          f"{100 * res['clipped_fraction_at_6']:.3f}% of its ReLU outputs on calibration data")
    print("cells: test accuracy % (SQNR dB of the quantized logits vs the float model's logits)")
    width = 18
    print(f"{'recipe':<18}" + "".join(f"{p:>{width}}" for p in PIPELINES))
    by = {(r["recipe"], r["pipeline"]): r for r in res["results"]}
    for rname in RECIPES:
        row = "".join(f"{by[(rname, p)]['accuracy']:>9.2f} ({by[(rname, p)]['logit_sqnr_db']:5.1f})"
                      for p in PIPELINES)
        print(f"{rname:<18}{row}")
    print("seconds per quantize_with call (quantize+calibrate+transforms+freeze): " +
          ", ".join(f"{k} {v:.2f}" for k, v in res["seconds_per_pipeline"].items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="trained models to average over")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    res = run(args.seeds)
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
