"""The shape of the code, checked on its syntax tree (fast, no torch): issue 15's rules.

- no import cycle among lorakit modules, function-local imports included (``if TYPE_CHECKING:`` ones excluded);
- no function over 80 lines;
- no ``isinstance(..., <method>Spec)`` outside ``lorakit/methods/``;
- ``IGNORE_INDEX`` assigned in ``lorakit/data/encode.py`` only;
- no ``except Exception`` / ``except BaseException`` / bare ``except:`` that swallows the error.

Each checker takes source text, so the tests at the bottom show that it finds a violation.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lorakit"
MAX_FUNCTION_LINES = 80
IGNORE_INDEX_HOME = "lorakit/data/encode.py"


# --- reading the package -------------------------------------------------------------------------------------


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``lorakit/data/load.py`` -> ``lorakit.data.load``; ``lorakit/data/__init__.py`` -> ``lorakit.data``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_sources(root: Path = PACKAGE) -> dict[str, tuple[str, str]]:
    """Module name -> (path relative to the repository, source text) for every ``.py`` file of the package."""
    return {
        module_name(path, root): (str(path.relative_to(root.parent)), path.read_text())
        for path in sorted(root.rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_script_block(test: ast.expr) -> bool:
    """``__name__ == "__main__"``: code that runs only when the file is the script ``__main__`` (``python -m``),
    a module object of its own above everything it imports, never when the module is imported."""
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` that runs when the module is imported or its functions called: not the bodies of
    ``if TYPE_CHECKING:`` blocks nor of a module's ``if __name__ == "__main__":`` script block."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and (_is_type_checking(node.test) or _is_script_block(node.test)):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


# --- (a) import graph ----------------------------------------------------------------------------------------


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def imported_modules(
    source: str, module: str, modules: Iterable[str], *, is_package: bool = False
) -> set[str]:
    """The lorakit modules ``module`` imports at run time (anywhere in its source, outside TYPE_CHECKING).

    ``from P import x`` counts as an import of ``P.x`` when that is a module, else of ``P``; relative imports
    are resolved against ``module``'s package. Only names in ``modules`` (the package's modules) are kept.
    """
    known = set(modules)
    root = module.split(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, is_package).split(".")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {name for name in found if name in known and name.split(".")[0] == root and name != module}


def import_graph(sources: dict[str, tuple[str, str]]) -> dict[str, set[str]]:
    """Module -> the lorakit modules it imports at run time."""
    return {
        name: imported_modules(text, name, sources, is_package=path.endswith("__init__.py"))
        for name, (path, text) in sources.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(component, graph) for component in components]


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph.get(node, ()) & members):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


# --- (b) function length -------------------------------------------------------------------------------------


def long_functions(source: str, path: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:qualified.name:lines`` for every function or method (nested ones too) longer than ``limit``."""
    found: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1  # type: ignore[operator]
                if length > limit:
                    found.append(f"{path}:{name}:{length}")
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


# --- (c) isinstance on a method spec -------------------------------------------------------------------------


def method_spec_names() -> set[str]:
    """Class names of the method specs registered in ``lorakit.methods.METHODS``."""
    from lorakit.methods import METHODS

    return {spec.__name__ for spec in METHODS.values()}


def _class_names(node: ast.expr) -> Iterator[str]:
    if isinstance(node, ast.Tuple):
        for element in node.elts:
            yield from _class_names(element)
    elif isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Attribute):
        yield node.attr


def spec_isinstance_calls(source: str, path: str, spec_names: set[str]) -> list[str]:
    """``path:line: isinstance(..., Spec)`` for every isinstance whose class is one of ``spec_names``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "isinstance"
            and len(node.args) == 2
        ):
            hits = sorted(set(_class_names(node.args[1])) & spec_names)
            if hits:
                found.append(f"{path}:{node.lineno}: isinstance(..., {', '.join(hits)})")
    return found


# --- (d) IGNORE_INDEX ----------------------------------------------------------------------------------------


def ignore_index_assignments(source: str, path: str) -> list[str]:
    """``path:line`` of every assignment to a name ``IGNORE_INDEX``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            if any(isinstance(n, ast.Name) and n.id == "IGNORE_INDEX" for n in names):
                found.append(f"{path}:{node.lineno}")
    return found


# --- (e) swallowing handlers ---------------------------------------------------------------------------------

_BROAD = {"Exception", "BaseException"}


def _is_broad(handler: ast.ExceptHandler) -> bool:
    return handler.type is None or bool(set(_class_names(handler.type)) & _BROAD)


def _raises(handler: ast.ExceptHandler) -> bool:
    """True when the body (outside nested functions and classes) re-raises or raises ``... from ...``."""
    stack: list[ast.AST] = list(handler.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Raise):
            reraise = node.exc is None or (
                isinstance(node.exc, ast.Name) and handler.name is not None and node.exc.id == handler.name
            )
            if reraise or node.cause is not None:
                return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def swallowing_handlers(source: str, path: str) -> list[str]:
    """``path:line: except X`` for every broad handler whose body neither re-raises nor raises ``from``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ExceptHandler) and _is_broad(node) and not _raises(node):
            caught = ast.unparse(node.type) if node.type is not None else ""
            found.append(f"{path}:{node.lineno}: except {caught}".rstrip() + ":")
    return found


# --- the package ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources() -> dict[str, tuple[str, str]]:
    return package_sources()


def test_the_package_is_found(sources):
    assert {"lorakit", "lorakit.pipeline", "lorakit.plan", "lorakit.data.encode"} <= set(sources)


def test_no_import_cycles(sources):
    cycles = find_cycles(import_graph(sources))
    assert not cycles, "import cycles among lorakit modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycles_in_the_plan_layer(sources):
    """plan, memory and distributed never import the builder (they take specs); the builder imports them."""
    graph = import_graph(sources)
    for module in (
        "lorakit.plan",
        "lorakit.memory",
        "lorakit.distributed",
        "lorakit.models",
        "lorakit.config",
    ):
        assert "lorakit.pipeline" not in graph[module], module
    assert {"lorakit.plan", "lorakit.distributed"} <= graph["lorakit.pipeline"]


def test_no_function_over_80_lines(sources):
    found = [hit for path, text in sources.values() for hit in long_functions(text, path)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


def test_no_method_spec_isinstance_outside_methods(sources):
    names = method_spec_names()
    found = [
        hit
        for path, text in sources.values()
        if not path.startswith("lorakit/methods/")
        for hit in spec_isinstance_calls(text, path, names)
    ]
    assert not found, "method-spec branches outside lorakit/methods/ (use a method hook):\n" + "\n".join(
        found
    )


def test_ignore_index_has_one_home(sources):
    found = [
        hit
        for path, text in sources.values()
        if path != IGNORE_INDEX_HOME
        for hit in ignore_index_assignments(text, path)
    ]
    assert not found, (
        f"IGNORE_INDEX assigned outside {IGNORE_INDEX_HOME} (import it from there):\n" + "\n".join(found)
    )
    assert ignore_index_assignments(sources["lorakit.data.encode"][1], IGNORE_INDEX_HOME)


def test_no_handler_swallows_every_exception(sources):
    found = [hit for path, text in sources.values() for hit in swallowing_handlers(text, path)]
    assert not found, (
        "handlers that swallow every exception (catch what you mean or re-raise):\n" + "\n".join(found)
    )


# --- the checkers find violations ----------------------------------------------------------------------------


def test_imported_modules_resolves_every_form():
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d", "pkg.e", "pkg.f"}
    source = """
import os
import pkg.a
from pkg import b, VERSION
from . import e
from .sub import c
from .sub.d import thing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from pkg import f
else:
    pass

def later():
    from pkg.sub import something
"""
    found = imported_modules(source, "pkg.x", modules)
    assert found == {"pkg.a", "pkg.b", "pkg", "pkg.e", "pkg.sub.c", "pkg.sub.d", "pkg.sub"}
    inside = imported_modules("from . import d\nfrom .. import a\n", "pkg.sub", modules, is_package=True)
    assert inside == {"pkg.sub.d", "pkg.a"}


def test_find_cycles_reports_a_function_local_cycle():
    sources = {
        "pkg": ("pkg/__init__.py", ""),
        "pkg.a": ("pkg/a.py", "from pkg import b\n"),
        "pkg.b": ("pkg/b.py", "def f():\n    from pkg.c import x\n"),
        "pkg.c": ("pkg/c.py", "import pkg.a\n"),
        "pkg.d": ("pkg/d.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"),
    }
    graph = import_graph(sources)
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    sources["pkg.c"] = ("pkg/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    assert find_cycles(import_graph(sources)) == []
    sources["pkg.c"] = ("pkg/c.py", "if __name__ == '__main__':\n    import pkg.a\n")
    assert find_cycles(import_graph(sources)) == []
    sources["pkg.c"] = ("pkg/c.py", "if __name__ == '__main__':\n    pass\nelse:\n    import pkg.a\n")
    assert find_cycles(import_graph(sources)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_long_functions_names_file_function_and_length():
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    source = f"def short():\n    pass\n\nclass K:\n    def long(self):\n{body}\n\n    def ok(self):\n        pass\n"
    assert long_functions(source, "pkg/m.py") == ["pkg/m.py:K.long:81"]
    assert long_functions(source, "pkg/m.py", limit=81) == []


def test_spec_isinstance_calls_finds_names_attributes_and_tuples():
    source = (
        "if isinstance(m, LoraSpec): pass\n"
        "if isinstance(m, (int, methods.FullSpec)): pass\n"
        "if isinstance(m, MethodSpec): pass\n"
    )
    found = spec_isinstance_calls(source, "pkg/m.py", {"LoraSpec", "FullSpec"})
    assert found == ["pkg/m.py:1: isinstance(..., LoraSpec)", "pkg/m.py:2: isinstance(..., FullSpec)"]


def test_method_spec_names_are_the_registry():
    assert {"LoraSpec", "FullSpec", "AdaLoraSpec", "PrefixTuningSpec"} <= method_spec_names()


def test_ignore_index_assignments():
    source = (
        "IGNORE_INDEX = -100\nfrom x import IGNORE_INDEX\nA, IGNORE_INDEX = 1, 2\nIGNORE_INDEX: int = -100\n"
    )
    assert ignore_index_assignments(source, "m.py") == ["m.py:1", "m.py:3", "m.py:4"]


def test_swallowing_handlers():
    source = """
try: f()
except Exception: pass
try: f()
except: log()
try: f()
except (ValueError, BaseException) as e: raise RuntimeError("x")
try: f()
except Exception: raise
try: f()
except Exception as e: raise e
try: f()
except Exception as e: raise ValueError("x") from e
try: f()
except ValueError: pass
try: f()
except Exception:
    def later():
        raise
"""
    assert swallowing_handlers(source, "m.py") == [
        "m.py:3: except Exception:",
        "m.py:5: except:",
        "m.py:7: except (ValueError, BaseException):",
        "m.py:17: except Exception:",
    ]
