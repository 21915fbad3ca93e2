"""``lowbit quantize --checkpoint DIR --recipe NAME --out DIR``: --json prints the summary only, the
output loads, and bad input is one line on stderr with exit 2."""
import json

import torch

import lowbit as lb
from lowbit.cli import main
from lowbit.cli._checkpoint import parse_bytes

from _stream_ckpt import meta_model, shard_bytes


def test_cli_json_summary_and_same_bytes_as_the_library(capsys, tmp_path, llama_dir, calib):
    src, _ = llama_dir
    torch.save(calib, tmp_path / "ids.pt")
    code = main(["quantize", "--checkpoint", str(src), "--recipe", "w4g128-gptq", "--calibration",
                 str(tmp_path / "ids.pt"), "--out", str(tmp_path / "cli"), "--memory-budget", "1G", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out)                                   # stdout is exactly the JSON summary
    assert s["checkpoint"] == str(src) and s["blocks"] == 2 and s["peak_rss_bytes"] > 0
    lb.quantize_checkpoint(src, tmp_path / "lib", lb.recipes.get("w4g128-gptq"), calib, progress=False)
    assert shard_bytes(tmp_path / "cli") == shard_bytes(tmp_path / "lib")
    assert (tmp_path / "cli" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    lb.load(tmp_path / "cli", meta_model(src))


def test_cli_bad_input_is_one_line(capsys, tmp_path):
    code = main(["quantize", "--checkpoint", str(tmp_path), "--recipe", "w4g128", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "config.json" in err or "safetensors" in err
    code = main(["quantize", "--recipe", "w4g128", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and "--checkpoint" in err


def test_parse_bytes():
    assert parse_bytes("4G") == 4 * 2**30 and parse_bytes("512M") == 512 * 2**20 and parse_bytes("4e9") == 4e9
    assert parse_bytes("2GiB") == 2 * 2**30
    import pytest

    with pytest.raises(ValueError, match="--memory-budget"):
        parse_bytes("lots")
