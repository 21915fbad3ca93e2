"""``lowbit quantize``: one recipe on one model, saved as a checkpoint, with a summary.

``quantize_model`` takes a float model, a :class:`~lowbit.recipes.Recipe`, calibration batches
(model inputs; ``None`` is allowed for weight-only recipes) and the output path, and returns a
JSON-able summary. The output directory is checked before any work and the checkpoint is written
atomically by ``lb.save``, so a failed run leaves whatever was at the output path as it was.

User models come as a factory (any callable returning an ``nn.Module``) plus a state dict
(:func:`build_user_model`); calibration inputs for them come from a ``.pt`` file
(:func:`load_calibration_file`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..checkpoint import save
from ..quantize import freeze, quantize
from ..recipes import Recipe
from ..transforms import quantize_with
from .metrics import fidelity, float_checkpoint_bytes, logits_of

__all__ = ["quantize_model", "build_user_model", "load_state_dict_file", "load_calibration_file", "load_test_file",
           "user_metrics", "check_out_path"]


def check_out_path(out: str | os.PathLike, keep: Sequence[str | os.PathLike] = ()) -> Path:
    """``out`` as a Path; ``ValueError`` if its directory does not exist or it is one of ``keep``
    (files the run reads, which it must not replace)."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    path = Path(out)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"out: directory {str(directory)!r} does not exist; create it first (mkdir -p) or "
                         "choose another path")
    if path.is_dir():
        raise ValueError(f"out: {str(path)!r} is a directory; give a file name such as {str(path / 'model.safetensors')!r}")
    for k in keep:
        if k is not None and path.exists() and Path(k).exists() and path.resolve() == Path(k).resolve():
            raise ValueError(f"out: {str(path)!r} is an input of this run; write the checkpoint to another file")
    return path


def _load_pt(path: str | os.PathLike, arg: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{arg}: no file {str(p)!r}; check the path")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds (pickle, zip, ...)
        raise ValueError(f"{arg}: {str(p)!r} could not be read with torch.load(weights_only=True) ({e}); "
                         "save it with torch.save") from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save(model.state_dict(), path)`` (or a ``.safetensors`` file)."""
    if str(path).endswith(".safetensors") and Path(path).is_file():
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"state_dict: {str(path)!r} is not a readable safetensors file ({e})") from e
    sd = _load_pt(path, "state_dict")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"state_dict: {str(path)!r} does not hold a state dict (a dict of name -> tensor); "
                         "save one with torch.save(model.state_dict(), path)")
    return sd


def load_calibration_file(path: str | os.PathLike, batch_size: int = 64) -> list:
    """Calibration inputs from a ``torch.save``-d file: a tensor ``(N, ...)`` (split into batches of
    ``batch_size`` rows), or a list of batches (tensors, argument tuples or keyword dicts)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    obj = _load_pt(path, "calibration")
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 0 or len(obj) == 0:
            raise ValueError(f"calibration: {str(path)!r} holds no sample (a tensor of shape {tuple(obj.shape)}); "
                             "save at least one input row: torch.save(x, path) with x of shape (N, ...)")
        return list(obj.split(batch_size))
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise ValueError(f"calibration: {str(path)!r} holds an empty list: calibration would see no batch; "
                             "save a tensor (N, ...) or a non-empty list of batches")
        return list(obj)
    raise ValueError(f"calibration: {str(path)!r} holds a {type(obj).__name__}; save a tensor of inputs (N, ...) or "
                     "a list of batches")


def load_test_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Test data from a ``torch.save``-d file: a tensor of inputs, or ``(inputs, labels)``, or
    ``{"inputs": ..., "labels": ...}``."""
    obj = _load_pt(path, "test")
    if isinstance(obj, dict):
        obj = (obj.get("inputs"), obj.get("labels"))
    if isinstance(obj, torch.Tensor):
        obj = (obj, None)
    if (not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[0], torch.Tensor)
            or not (obj[1] is None or isinstance(obj[1], torch.Tensor))):
        raise ValueError(f"test: {str(path)!r} must hold a tensor of inputs, a tuple (inputs, labels) or a dict "
                         "{'inputs': ..., 'labels': ...}")
    x, y = obj
    if len(x) == 0:
        raise ValueError(f"test: {str(path)!r} holds no sample")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise ValueError(f"test: labels must be a 1-D tensor with one class index per input ({len(x)}), got shape "
                         f"{tuple(y.shape)}")
    return x, y


def user_metrics(float_model: nn.Module, q: nn.Module, test: tuple | None, batches: list | None) -> dict:
    """Accuracy / agreement / KL on ``test`` (or on the calibration inputs if there is no test set);
    empty if there are no inputs or the model does not return ``(N, classes)`` logits."""
    if test is not None:
        x, y, where = test[0], test[1], "test"
    elif batches and all(isinstance(b, torch.Tensor) for b in batches):
        x, y, where = torch.cat(batches), None, "calibration inputs"
    else:
        return {}
    try:
        zf, zq = logits_of(float_model, x), logits_of(q, x)
    except TypeError:
        return {}
    if zf.ndim != 2:
        return {}
    f = fidelity(zf, zq, y)
    return {"accuracy": f.accuracy, "float_accuracy": f.float_accuracy, "agreement": f.agreement, "kl": f.kl,
            "eval_on": where, "samples": f.samples}


def build_user_model(factory: Callable[[], nn.Module], state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """``factory()`` with ``state_dict`` loaded (strictly), in eval mode."""
    if not callable(factory):
        raise TypeError(f"factory must be callable (returning an nn.Module), got {type(factory).__name__}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory returned a {type(model).__name__}, not a torch.nn.Module; it must build the model")
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise ValueError(f"state_dict does not fit the model the factory builds ({type(model).__name__}): "
                             f"{detail[:600]}; pass the state dict saved from this architecture "
                             "(torch.save(model.state_dict(), path))") from e
    return model.eval()


def quantize_model(model: nn.Module, recipe: Recipe, batches: Iterable | None, out: str | os.PathLike, *,
                   include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   evaluate: Callable[[nn.Module, nn.Module], dict] | None = None) -> dict:
    """Quantize a copy of ``model`` with ``recipe``, save it to ``out``; returns a summary dict.

    ``evaluate(float_model, q)`` adds metrics (e.g. accuracy, KL) to the summary.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a lowbit.recipes.Recipe (lowbit.recipes.get(name)), got {type(recipe).__name__}")
    path = check_out_path(out)
    opts = recipe.quantize_options()
    if include:
        opts["include"] = list(include)
    if exclude:
        opts["exclude"] = list(recipe.exclude) + list(exclude)
    t0, c0 = time.perf_counter(), time.process_time()
    if batches is None:
        if recipe.needs_calibration:
            raise ValueError(f"recipe {recipe.name!r} quantizes activations and needs calibration inputs; give them "
                             "(lowbit quantize --calibration FILE.pt) or choose a weight-only recipe (w4g128)")
        q = freeze(quantize(model, **opts))
    else:
        q = quantize_with(model, batches, transforms=list(recipe.transforms), **opts)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    save(q, path)
    size, fsize = path.stat().st_size, float_checkpoint_bytes(model)
    info = q.lowbit_info
    summary = {"recipe": recipe.name, "description": recipe.description, "out": str(path), "size_bytes": size,
               "float_size_bytes": fsize, "ratio": fsize / size, "seconds": seconds, "cpu_seconds": cpu,
               "quantized": list(info.quantized), "skipped": dict(info.skipped),
               "folded": [list(p) for p in info.folded], "uncalibrated": list(info.uncalibrated)}
    cov = getattr(q, "lowbit_coverage", None)
    if cov is not None:   # every layer: quantized, or float and why; ties kept or untied
        summary["coverage"] = cov.as_dict()
    if evaluate is not None:
        summary.update(evaluate(model, q))
    return summary
