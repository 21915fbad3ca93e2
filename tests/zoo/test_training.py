"""lowbit.zoo.training: deterministic, resumable, shardable, refuses NaN, evaluates honestly."""
import dataclasses

import pytest
import torch

from lowbit import zoo

pytest.importorskip("sklearn")

FAST = zoo.TrainConfig(epochs=3, batch_size=128, lr=1e-2)


@pytest.fixture(scope="module")
def digits():
    return zoo.load_dataset("digits")


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_runs_give_identical_weights_even_under_deterministic_algorithms(digits):
    m1 = zoo.build_model("digits")
    h1 = zoo.train(m1, digits, FAST, eval_test=False)
    m2 = zoo.build_model("digits")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        zoo.train(m2, digits, FAST, eval_test=False)
    finally:
        torch.use_deterministic_algorithms(was)
    _assert_same(_weights(m1), _weights(m2))
    assert len(h1) == 3 and h1[-1].loss < h1[0].loss          # it learns
    m3 = zoo.build_model("digits")
    zoo.train(m3, digits, dataclasses.replace(FAST, seed=1), eval_test=False)
    assert not torch.equal(m3.classifier.weight, m1.classifier.weight)


def test_resume_reaches_the_uninterrupted_result(digits):
    straight = zoo.build_model("digits")
    zoo.train(straight, digits, FAST, eval_test=False)

    saved = {}

    def stop_after_first(stats, state):
        saved.update(state=state, weights=_weights(first))
        return False

    first = zoo.build_model("digits")
    hist = zoo.train(first, digits, FAST, callback=stop_after_first, eval_test=False)
    assert len(hist) == 1 and saved["state"]["epoch"] == 0
    resumed = zoo.build_model("digits")
    resumed.load_state_dict(saved["weights"])
    torch.manual_seed(1234)   # the caller's global RNG state must not matter
    hist2 = zoo.train(resumed, digits, FAST, resume=saved["state"], eval_test=False)
    assert [s.epoch for s in hist2] == [1, 2]
    _assert_same(_weights(straight), _weights(resumed))
    with pytest.raises(ValueError, match="epochs"):
        zoo.train(resumed, digits, dataclasses.replace(FAST, epochs=5), resume=saved["state"])


def test_shards_split_each_epoch_disjointly(digits):
    seen = {0: [], 1: []}
    for rank in (0, 1):
        model = zoo.build_model("digits")
        model.register_forward_pre_hook(lambda m, args, r=rank: seen[r].append(args[0].reshape(len(args[0]), -1)))
        zoo.train(model, digits, dataclasses.replace(FAST, epochs=1), shard=(rank, 2), eval_test=False)
    rows = {r: {tuple(x.tolist()) for x in torch.cat(seen[r])} for r in (0, 1)}
    n0, n1 = (sum(len(b) for b in seen[r]) for r in (0, 1))
    assert n0 + n1 == len(digits.x_train) and abs(n0 - n1) <= 1
    everything = {tuple(x.tolist()) for x in digits.x_train.reshape(len(digits.x_train), -1)}
    assert rows[0] | rows[1] == everything


def test_nan_loss_stops_before_the_bad_step_and_threads_are_restored(digits):
    bad = dataclasses.replace(digits, x_train=torch.full_like(digits.x_train, float("nan")))
    model = zoo.build_model("digits")
    before = _weights(model)
    threads = torch.get_num_threads()
    with pytest.raises(FloatingPointError, match="lr"):
        zoo.train(model, bad, FAST)
    assert torch.get_num_threads() == threads
    after = _weights(model)
    for name, _ in model.named_parameters():      # parameters untouched (BN buffers saw the batch)
        assert torch.equal(before[name], after[name]), name


def test_evaluate_and_predict(digits):
    model = zoo.build_model("digits")
    zoo.train(model, digits, FAST, eval_test=False)
    model.train()
    logits = zoo.predict(model, digits.x_test, batch_size=50)
    assert model.training                                       # mode restored
    model.eval()
    with torch.no_grad():
        ref = model(digits.x_test)
    torch.testing.assert_close(logits, ref)
    manual = (ref.argmax(1) == digits.y_test).double().mean().item()
    assert zoo.evaluate(model, digits.x_test, digits.y_test) == pytest.approx(manual)
    with pytest.raises(ValueError, match="len"):
        zoo.evaluate(model, digits.x_test, digits.y_test[:5])


def test_callback_gets_test_accuracy(digits):
    got = []
    zoo.train(zoo.build_model("digits"), digits, dataclasses.replace(FAST, epochs=2),
              callback=lambda s, st: got.append((s.epoch, s.test_accuracy, sorted(st))))
    assert [g[0] for g in got] == [0, 1]
    assert all(0.0 <= g[1] <= 1.0 for g in got)
    assert got[0][2] == ["config", "epoch", "optimizer", "scheduler"]


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("weight_decay", -1.0),
                                         ("schedule", "cosine"), ("threads", 0)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        zoo.TrainConfig(**{field: value})


def test_bad_arguments(digits):
    with pytest.raises(TypeError, match="model"):
        zoo.train("model", digits)
    with pytest.raises(TypeError, match="dataset"):
        zoo.train(zoo.build_model("digits"), digits.x_train)
    with pytest.raises(ValueError, match="shard"):
        zoo.train(zoo.build_model("digits"), digits, FAST, shard=(2, 2))
