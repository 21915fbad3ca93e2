"""lowbit.zoo.models: standard modules only, Conv -> BN -> ReLU everywhere, the residual add is real."""
import pytest
import torch
import torch.fx
from torch import nn

from lowbit import zoo

STANDARD = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear,
            nn.Sequential, zoo.ResidualBlock1d, zoo.DigitsCNN, zoo.MNIST1DCNN)


@pytest.mark.parametrize("name,shape", [("digits", (5, 1, 8, 8)), ("mnist1d", (5, 1, 40))])
def test_shapes_modules_and_fx(name, shape):
    model = zoo.build_model(name).eval()
    x = torch.randn(*shape)
    y = model(x)
    assert y.shape == (5, 10)
    mods = list(model.modules())
    assert all(isinstance(m, STANDARD) for m in mods)
    assert len({id(m) for m in mods}) == len(mods)              # no module instance used twice
    assert isinstance(model.classifier, nn.Linear)
    gm = torch.fx.symbolic_trace(model)                          # quantizers and analysis trace it
    torch.testing.assert_close(gm(x), y)
    # every convolution feeds exactly one BatchNorm, which feeds a ReLU (or the residual add)
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv1d, nn.Conv2d))]
    assert len(convs) >= 3
    for n in convs:
        (user,) = n.users
        assert isinstance(gm.get_submodule(user.target), (nn.BatchNorm1d, nn.BatchNorm2d))
        assert gm.get_submodule(n.target).bias is None


def test_residual_block_adds_its_input():
    block = zoo.ResidualBlock1d(4).eval()
    x = torch.randn(3, 4, 10)
    branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), torch.relu(x + branch))
    gm = torch.fx.symbolic_trace(zoo.build_model("mnist1d"))
    assert any(n.op == "call_function" and "add" in str(n.target) for n in gm.graph.nodes)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a, b = zoo.build_model("digits"), zoo.build_model("digits")
    assert torch.rand(1) == before
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
