"""The host-free core's modules import each other without a circle (every import counts, also
one inside a function), and never import the host."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "productscene"
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution")


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(core modules ``path`` imports, top-level names of everything else it imports)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    core, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "productscene":
                core.add(n)
            else:
                other.add(n.split(".")[0])
    return core, other


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {_module_name(p): p for p in CORE.rglob("*.py")}
    edges, foreign = {}, {}
    for name, path in files.items():
        core, other = _imports(path)
        # "from .x import y" names module x, or module x.y when y is a submodule
        edges[name] = {n for n in core if n in files and n != name}
        foreign[name] = other
    return edges, foreign


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if m.startswith(n + "."):  # a package importing its own submodule is no circle
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_core_module_imports_another_that_imports_it_back():
    edges, _ = _graph()
    assert "productscene.library" in edges["productscene.personality"]  # the graph sees imports
    assert "productscene.prompt" in edges["productscene.library"]
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_core_never_imports_the_host():
    _, foreign = _graph()
    offenders = {name: sorted(set(other) & set(HOST_MODULES)) for name, other in foreign.items()}
    assert {n: o for n, o in offenders.items() if o} == {}
