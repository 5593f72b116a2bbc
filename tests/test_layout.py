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
    for _, path in _modules():
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


def _import_graph() -> dict[str, set[str]]:
    """Module -> the lolrl modules it imports, anywhere in it (a function-local import counts: it still
    needs the other module loaded first when it runs). ``from lolrl.x import y`` names the module
    ``lolrl.x.y`` where ``y`` is one."""
    modules = {m for m, _ in _modules()}
    graph = {}
    for module, path in _modules():
        targets = set()
        for target, names, _ in _imports(path):
            targets |= {t for t in (target, *(f"{target}.{n}" for n in names)) if t in modules}
        graph[module] = targets - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_one_cycle(graph, sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def test_cycle_finder_finds_a_hidden_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_between_lolrl_modules():
    """No two modules import each other, directly or round a longer circle, counting function-local
    imports: a circle hidden inside a function still ties the two modules together."""
    cycles = _cycles(_import_graph())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_import_lolrl_is_light():
    code = "import sys, lolrl; assert 'torch' not in sys.modules, 'torch'; print(lolrl.TaskInfo().name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "custom"


def test_public_names_still_import_from_the_package_root():
    import lolrl

    for name in lolrl.__all__:
        assert getattr(lolrl, name) is not None


ROOT = PACKAGE.parent


def test_readme_first_screen_holds_the_set_up_demo_and_test_commands():
    """The README's first 40 lines: the set-up command, a demo that runs offline, and the test command CI runs."""
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash setup.sh" in head and "bash setup.sh" in ci
    assert "lolrl demo --output_dir" in head
    test_command = "HF_HUB_OFFLINE=1 python -m pytest -n 2 tests"
    assert test_command in head and test_command in ci


def test_no_module_or_script_points_outside_the_repository_for_documentation():
    """Docstrings and scripts name docs/ pages, not ../shared (data paths there stay optional, in bench/ only)."""
    sources = [*PACKAGE.rglob("*.py"), *ROOT.glob("*.py")]
    outside = [str(p.relative_to(ROOT)) for p in sources if "../shared" in p.read_text() or "/shared/" in p.read_text()]
    assert outside == []


def test_tests_mirror_the_package():
    """A test file lives beside the layer it tests (tests/engine/ for lolrl/engine/, tests/tasks/hh/ for
    lolrl/tasks/hh/, ...) or under tests/scripts/ (the command lines, end to end); only this file, about the
    whole package, sits at the top."""
    tests = ROOT / "tests"
    layers = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    for path in tests.rglob("test_*.py"):
        folder = path.parent.relative_to(tests).as_posix()
        assert folder in layers | {"scripts"} or path.name == "test_layout.py" and folder == ".", path


def test_no_test_module_imports_another():
    """Helpers shared by several test files live in tests/ as plain modules (script_args, logprob_cases, ...): a
    test file never imports another test file (its tests would be collected twice, its fixtures leak)."""
    importing = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            importing += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert importing == []
