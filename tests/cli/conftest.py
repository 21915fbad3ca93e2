"""A user model package on sys.path (``usermodels:mlp`` ...) and its files, for the CLI tests."""
import textwrap

import pytest
import torch

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def wider():
        return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))

    def relu_only():
        return nn.Sequential(nn.ReLU(), nn.Flatten())

    def not_a_model():
        return 42
''')


@pytest.fixture
def user(tmp_path, monkeypatch):
    """Paths of a user model: module ``usermodels``, its weights, calibration and test inputs, and a
    pre-existing file at the output path (which a failed run must leave as it was)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "usermodels.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    import importlib
    import sys

    sys.modules.pop("usermodels", None)
    mod = importlib.import_module("usermodels")
    model = mod.mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    paths = {"dir": tmp_path, "state_dict": tmp_path / "mlp.pt", "calibration": tmp_path / "calib.pt",
             "test": tmp_path / "test.pt", "out": tmp_path / "out.safetensors", "model": model, "x": x, "y": y}
    torch.save(model.state_dict(), paths["state_dict"])
    torch.save(x[:128], paths["calibration"])
    torch.save((x[128:], y[128:]), paths["test"])
    paths["out"].write_bytes(b"precious")
    return paths
