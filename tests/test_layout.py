"""The package's floors: imports point down (or sideways within a floor), never up; no import circles among
mllm modules; argument parsing only in mllm/cli.

Every `import` / `from ... import` statement of every module counts for the floor rule, including those inside
functions; the circle rule looks at module-level imports (those that run when the module is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mllm"

# Bottom to top: a module may import from its own floor or any floor below.
FLOORS = [
    ["mllm", "mllm.jsonio", "mllm.outputs"],
    ["mllm.model"],
    ["mllm.world"],
    ["mllm.data"],
    ["mllm.eval"],
    ["mllm.train"],
    ["mllm.course"],
    ["mllm.serve"],
    ["mllm.cli"],
]
ARGUMENT_PARSERS = {"argparse", "HfArgumentParser"}
CLI = "mllm.cli"
# The one import allowed to climb: `import mllm` registers the model with transformers' Auto classes.
ALLOWED_UPWARD = {("mllm", "mllm.model.auto")}


def floor_of(module: str) -> int:
    """The floor of the longest FLOORS prefix naming `module` (a package or a module inside it)."""
    best, level = -1, None
    for index, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level is None:
        raise ValueError(f"{module}: on no floor")
    return level


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules(root: Path = PACKAGE) -> dict[str, tuple[ast.Module, bool]]:
    """name -> (syntax tree, is a package) of every module under `root`."""
    return {module_name(path, root): (ast.parse(path.read_text(), str(path)), path.name == "__init__.py")
            for path in sorted(root.rglob("*.py"))}


def imports(name: str, tree: ast.Module, is_package: bool, known: set[str], module_level: bool = False):
    """(imported mllm module, line) pairs; relative imports resolved; `from a import b` names a.b when a.b is a
    module. With `module_level`, function bodies are skipped (they run only when called)."""
    package = name if is_package else name.rpartition(".")[0]

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            yield child
            yield from walk(child)

    for node in walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno


def upward_imports(modules: dict) -> list[str]:
    known = set(modules)
    found = []
    for name, (tree, is_package) in modules.items():
        for target, line in imports(name, tree, is_package, known):
            if (name, target) in ALLOWED_UPWARD:
                continue
            if (target == "mllm" or target.startswith("mllm.")) and floor_of(target) > floor_of(name):
                found.append(f"{name}:{line} imports {target} (floor {floor_of(target)} above {floor_of(name)})")
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def module_graph(modules: dict) -> dict[str, set[str]]:
    known = set(modules)
    return {name: {t for t, _ in imports(name, tree, is_package, known, module_level=True) if t in known}
            for name, (tree, is_package) in modules.items()}


def parser_uses(modules: dict) -> list[str]:
    """argparse / HfArgumentParser imported or named outside mllm.cli."""
    found = []
    for name, (tree, _) in modules.items():
        if name == CLI or name.startswith(CLI + "."):
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            found += [f"{name}:{node.lineno} uses {n}" for n in names if n in ARGUMENT_PARSERS]
    return found


# ---- the package ---------------------------------------------------------------------------------------------------

def test_every_module_is_on_a_floor():
    for name in read_modules():
        floor_of(name)


def test_no_import_climbs_a_floor():
    assert upward_imports(read_modules()) == []


def test_no_import_circles():
    assert find_cycles(module_graph(read_modules())) == []


def test_argument_parsing_only_in_cli():
    assert parser_uses(read_modules()) == []


def test_cli_modules_each_have_a_main():
    from mllm.cli.main import VERBS

    for module, _ in VERBS.values():
        assert module.startswith(CLI + ".")
        tree, _ = read_modules()[module]
        assert "main" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, module


# ---- the checker itself, on fake packages ------------------------------------------------------------------------

def fake(tmp_path: Path, files: dict[str, str]) -> dict:
    root = tmp_path / "mllm"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_modules(root)


def test_checker_finds_an_upward_import_even_inside_a_function(tmp_path):
    modules = fake(tmp_path, {"__init__.py": "", "model/__init__.py": "", "eval/__init__.py": "",
                              "eval/chair.py": "X = 1\n",
                              "model/llm.py": "def f():\n    from mllm.eval.chair import X\n    return X\n"})
    assert upward_imports(modules) == ["mllm.model.llm:2 imports mllm.eval.chair (floor 4 above 1)"]


def test_checker_resolves_relative_imports(tmp_path):
    modules = fake(tmp_path, {"__init__.py": "", "data/__init__.py": "", "train/__init__.py": "",
                              "train/sft.py": "X = 1\n", "data/collate.py": "from ..train import sft\n"})
    assert upward_imports(modules) == ["mllm.data.collate:1 imports mllm.train.sft (floor 5 above 3)"]


def test_checker_allows_imports_down_and_sideways(tmp_path):
    modules = fake(tmp_path, {"__init__.py": "", "jsonio.py": "", "model/__init__.py": "", "model/a.py": "",
                              "train/__init__.py": "", "train/b.py": "from mllm.model import a\nimport mllm.jsonio\n",
                              "train/c.py": "from . import b\n"})
    assert upward_imports(modules) == []


def test_checker_finds_circles_at_module_level_only(tmp_path):
    modules = fake(tmp_path, {"__init__.py": "", "model/__init__.py": "",
                              "model/a.py": "from mllm.model import b\n", "model/b.py": "import mllm.model.c\n",
                              "model/c.py": "from mllm.model.a import X\n",
                              "model/d.py": "from mllm.model import e\n",
                              "model/e.py": "def f():\n    from mllm.model import d\n"})
    assert find_cycles(module_graph(modules)) == [["mllm.model.a", "mllm.model.b", "mllm.model.c"]]
    assert find_cycles({"x": {"y"}, "y": {"x"}, "z": {"z"}, "w": {"x"}}) == [["x", "y"], ["z"]]


def test_checker_finds_argument_parsing_outside_cli(tmp_path):
    modules = fake(tmp_path, {"__init__.py": "", "eval/__init__.py": "", "cli/__init__.py": "",
                              "eval/yesno.py": "def main():\n    import argparse\n",
                              "train/sft.py": "from transformers import HfArgumentParser\n",
                              "cli/yesno.py": "import argparse\nfrom transformers import HfArgumentParser\n"})
    assert parser_uses(modules) == ["mllm.eval.yesno:2 uses argparse", "mllm.train.sft:1 uses HfArgumentParser"]


def test_unknown_top_package_is_on_no_floor():
    with pytest.raises(ValueError):
        floor_of("mllm_other")
