"""Imports inside lowbit only go downward through the layers of DESIGN.md."""
import ast
import pathlib

import lowbit

# rank of each top-level module/package of lowbit; a module may import its own rank or lower.
LAYERS = {
    "spec": 0, "formats": 0,   # formats sits beside spec and does not import it
    "ops": 1,
    "observers": 2, "qtensor": 2,
    "modules": 3,
    "quantize": 4, "accounting": 4, "qat": 4, "transforms": 4, "gptq": 4, "batches": 4,
    "analysis": 5, "integer": 5, "export": 5, "checkpoint": 5, "recipes": 5, "demo": 5, "train": 5,
    "cli": 6, "__main__": 6,
    "zoo": 5,   # built-in data and models: imports no other lowbit module
    "transformer": 5,
    "stream": 5,   # streamed checkpoint quantization: recipes, gptq, checkpoint writer
    "__init__": 7,
}
SRC = pathlib.Path(lowbit.__file__).parent


def _top(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _lowbit_imports(path: pathlib.Path, root: pathlib.Path = SRC):
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(root).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lowbit."):
                    yield a.name.split(".")[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("lowbit."):
                    yield node.module.split(".")[1]
                elif node.module == "lowbit":
                    yield from (a.name for a in node.names)
                continue
            base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                yield parts[0]
            else:  # "from . import x" at the package root
                yield from (a.name for a in node.names)


def test_every_module_has_a_layer():
    tops = {_top(p) for p in SRC.rglob("*.py")}
    assert tops <= set(LAYERS), f"add these modules to LAYERS (DESIGN.md): {tops - set(LAYERS)}"


def test_imports_only_go_downward():
    bad = []
    for path in SRC.rglob("*.py"):
        me = _top(path)
        for target in _lowbit_imports(path):
            if target not in LAYERS:
                continue
            if me == "zoo" and target != "zoo":
                bad.append(f"{path.relative_to(SRC)} imports {target}: zoo stands apart")
            elif target == "zoo" and LAYERS[me] < LAYERS["zoo"]:
                bad.append(f"{path.relative_to(SRC)} imports zoo")
            elif LAYERS[target] > LAYERS[me]:
                bad.append(f"{path.relative_to(SRC)} (layer {LAYERS[me]}) imports {target} (layer {LAYERS[target]})")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    fake = tmp_path / "lowbit"
    (fake / "ops").mkdir(parents=True)
    (fake / "ops" / "bad.py").write_text("from ..modules import QuantLinear\nfrom .. import quantize\n")
    found = list(_lowbit_imports(fake / "ops" / "bad.py", root=fake))
    assert found == ["modules", "quantize"]
