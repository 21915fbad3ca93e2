"""lowbit.cli.main: commands are found by module, errors become exit status 2 and one line."""
import json
import sys

import pytest

import lowbit.cli
from lowbit.cli import build_parser, commands, main


def test_the_commands_are_found_in_order():
    names = [m.NAME for m in commands()]
    assert names[:2] == ["demo", "quantize"]
    assert len(set(names)) == len(names)


@pytest.fixture
def extra_command(tmp_path, monkeypatch):
    """A command module dropped into the package directory (here: a second search path entry)."""
    (tmp_path / "hello.py").write_text(
        "NAME = 'hello'\nHELP = 'say hello'\nORDER = 99\n"
        "def add_arguments(p):\n    p.add_argument('--who', default='world')\n"
        "def run(args):\n"
        "    if args.who == 'nobody':\n        raise ValueError('who: nobody is nobody; name someone')\n"
        "    return {'hello': args.who}\n")
    (tmp_path / "broken.py").write_text("import no_such_package_anywhere\nNAME = 'broken'\n")
    monkeypatch.setattr(lowbit.cli, "__path__", list(lowbit.cli.__path__) + [str(tmp_path)])
    yield
    for name in ("lowbit.cli.hello", "lowbit.cli.broken"):
        sys.modules.pop(name, None)


def test_a_new_command_is_a_new_file(extra_command, capsys):
    assert main(["hello", "--who", "lowbit", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"hello": "lowbit"}


def test_library_errors_exit_2_with_one_line(extra_command, capsys):
    assert main(["hello", "--who", "nobody"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == "lowbit hello: error: who: nobody is nobody; name someone"


def test_a_command_that_does_not_import_does_not_break_the_others(extra_command, capsys):
    assert main(["hello"]) == 0
    assert main(["broken"]) == 2
    assert "no_such_package_anywhere" in capsys.readouterr().err


def test_argparse_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["demo", "--model", "resnet50"])
    assert e.value.code == 2
