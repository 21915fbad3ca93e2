import torch
from torch import nn

from lowbit.transforms import find_conv_bn_pairs, fold_batchnorm


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.shared = nn.Conv1d(4, 4, 1)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn2(self.shared(y)) + self.shared(y)  # shared conv: must not be folded


def test_folded_model_computes_the_same_function():
    torch.manual_seed(0)
    for model, x in [
        (nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1), nn.BatchNorm2d(2)),
         torch.randn(4, 3, 8, 8)),
        (Custom(), torch.randn(4, 2, 9)),
    ]:
        model = _randomize_bn(model)
        expected = model(x)
        pairs = fold_batchnorm(model)
        assert pairs
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_shared_layer_is_not_folded():
    pairs = find_conv_bn_pairs(_randomize_bn(Custom()))
    assert pairs == [("conv", "bn")]
