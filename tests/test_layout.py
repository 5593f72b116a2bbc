"""The package's layers: a lower folder never imports a higher one or another task family, no module
imports another's private name, and ``import lolrl`` stays light."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lolrl"
RANK = {"utils": 0, "engine": 1, "online": 2, "tasks": 3, "demo": 3}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return "top"
    return ".".join(parts[1:3]) if parts[1] == "tasks" and len(parts) > 2 else parts[1]


def _rank(layer: str) -> int:
    return RANK.get(layer.split(".")[0], 99)


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lolrl"):
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lolrl"):
                    yield alias.name, [], node.lineno


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(p for p in rel.parts if p != "__init__"), path


def test_no_relative_imports_and_every_lolrl_import_resolves():
    names = {m for m, _ in _modules()}
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}:{node.lineno}: relative import"
        for target, _, line in _imports(path):
            assert target in names or target.rsplit(".", 1)[0] in names, f"{path}:{line}: no module {target}"


def test_lower_layers_never_import_higher_ones_or_other_tasks():
    for module, path in _modules():
        here = _layer(module)
        if here == "top":
            continue
        for target, _, line in _imports(path):
            there = _layer(target)
            assert there != "top", f"{path}:{line}: imports the package root"
            assert _rank(there) <= _rank(here), f"{path}:{line}: {here} imports the higher layer {there}"
            if _rank(there) == _rank(here) == 3:
                assert there == here, f"{path}:{line}: {here} imports another task family ({there})"


def test_no_module_imports_a_private_name():
    for _, path in _modules():
        for target, names, line in _imports(path):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path}:{line}: imports private {private} from {target}"


def test_import_lolrl_is_light():
    code = "import sys, lolrl; assert 'torch' not in sys.modules, 'torch'; print(lolrl.TaskInfo().name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "custom"


def test_public_names_still_import_from_the_package_root():
    import lolrl

    for name in lolrl.__all__:
        assert getattr(lolrl, name) is not None
