"""lowbit.demo.run_demo on the built-in models, checked against the issue's targets (losses in
points of accuracy against the float model, measured on the test split)."""
import pytest

from lowbit import zoo
from lowbit.demo import run_demo


def test_digits_recipes_meet_the_targets():
    res = run_demo("digits", ["w8a8", "w8a8-mse", "w8a8-entropy", "w4a8"])
    model, data = zoo.get("digits")
    float_acc = zoo.evaluate(model, data.x_test, data.y_test)
    assert res.float_accuracy == pytest.approx(float_acc)
    rows = {r.recipe: r for r in res.results}
    for name in ("w8a8", "w8a8-mse", "w8a8-entropy"):
        assert rows[name].accuracy >= float_acc - 0.003, name        # issue: W8A8 loses <= 0.3 points on digits
        assert rows[name].agreement >= 0.99
    assert rows["w4a8"].accuracy >= float_acc - 0.015
    assert rows["w4a8"].size_bytes < rows["w8a8"].size_bytes < res.float_size_bytes


def test_entropy_calibration_is_as_good_as_minmax_on_relu_networks():
    """ONNX Runtime's KL search clipped the ReLU outputs of the MNIST-1D CNN at ~1/8 of their max
    (25% accuracy against 99% with min/max): the default (TensorRT's) search must stay within a
    point of min/max, and of the MNIST-1D target (W8A8 loses <= 0.5 points)."""
    res = run_demo("mnist1d", ["w8a8", "w8a8-entropy"])
    rows = {r.recipe: r for r in res.results}
    assert rows["w8a8-entropy"].accuracy >= rows["w8a8"].accuracy - 0.01
    assert rows["w8a8-entropy"].accuracy >= res.float_accuracy - 0.005
    assert rows["w8a8"].accuracy >= res.float_accuracy - 0.005


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="recipe must be one of"):
        run_demo("digits", ["nope"])
    with pytest.raises(ValueError, match="model must be one of"):
        run_demo("cifar10")
    with pytest.raises(ValueError, match="recipes is empty"):
        run_demo("digits", [])
