"""The README's commands are the ones CI runs."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1, ci
    assert ci[0] in readme.splitlines()
    assert "pytest" in ci[0]


def test_the_readme_example_runs_and_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    import re

    import pytest
    pytest.importorskip("mnist1d")
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    shown = re.search(r"```python\n.*?```.*?```\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert (tmp_path / "mnist1d-w4a8.safetensors").is_file()
    # the same lines, except for last-digit float noise across machines: compare the words and layer names
    words = lambda text: [w for w in text.split() if not re.fullmatch(r"[-+0-9.,e%()]+", w)]   # noqa: E731
    assert words(printed) == words(shown)
    layer_lines = [line.split()[0] for line in shown.splitlines()[-7:]]
    assert all(name in printed for name in layer_lines)
