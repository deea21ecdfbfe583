"""The house's structure, checked on the source (nothing is imported): the host-free core imports
nothing above it and loads nothing by path, it has no import circle, the development tools reach the
dev kit by plain import, and no run of six lines is written twice in the core or the adapters."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "productscene"
# what the core must never import: ComfyUI (its packages and top-level modules), the adapters, the
# command line above it, the development tools
ABOVE_THE_CORE = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "execution", "server",
                  "nodes", "scripts", "devkit", "productscene_cli", "tests", "bench")
PATH_LOADERS = ("spec_from_file_location", "SourceFileLoader", "run_path", "load_source", "exec_module", "load_script")


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, anywhere in it (functions included), as absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            found.append((stem, node.lineno))
            found += [(f"{stem}.{a.name}", node.lineno) for a in node.names]  # "from . import x": a module
    return found


def path_loads(path: Path) -> list[str]:
    text = path.read_text()
    return [f"{path.relative_to(ROOT)}:{i}: {name}" for i, line in enumerate(text.splitlines(), 1)
            for name in PATH_LOADERS if re.search(rf"\b{name}\b", line)]


def test_the_core_imports_nothing_above_it_and_loads_nothing_by_path():
    wrong = []
    for path in python_files("productscene"):
        for name, line in imports(path):
            top = name.split(".")[0]
            if path == CORE / "__main__.py" and name.startswith("productscene_cli"):
                continue  # the entry of ``python -m productscene``: nothing imports it
            if top in ABOVE_THE_CORE:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
        wrong += path_loads(path)
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_in_the_core():
    modules = {module_name(p): p for p in python_files("productscene") if p.name != "__main__.py"}
    graph = defaultdict(set)
    for name, path in modules.items():
        for target, _ in imports(path):
            while target and target not in modules:  # "a.b.c" may name an attribute of module "a.b"
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own parents
                graph[name].add(target)
    circles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(modules):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_development_tools_reach_the_dev_kit_by_import():
    """Scripts, benchmarks, tests and the dev kit itself load nothing by file path: the one place
    that does is the command line's import of this repository as a ComfyUI pack."""
    loads = [hit for p in python_files("scripts", "bench", "tests", "devkit", "productscene_cli", "nodes")
             if p != ROOT / "tests" / "test_structure.py" for hit in path_loads(p)]
    assert {hit.split(":")[0] for hit in loads} == {"productscene_cli/comfyui.py"}, "\n".join(loads)
    users = [p for p in python_files("scripts", "bench", "tests") if "devkit" in p.read_text()]
    assert len(users) > 20  # the dev kit is what they share


SCHEMA = re.compile(r"^(io\.\w+\.(Input|Output)\(|tooltip=|display_name=|default=|min=|max=|step=|options=|"
                    r"multiline=|optional=|category=|description=|node_id=|\]|\),?$|\)\],?$|\+?\s*\")")


def meaningful_lines(path: Path) -> list[tuple[int, str]]:
    """The lines that count for repetition: code, with white space folded; not blank lines,
    comments, imports, lone punctuation or docstring text."""
    out, in_doc = [], False
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = " ".join(raw.split())
        quotes = line.count('"""')
        if in_doc:
            in_doc = quotes % 2 == 0
            continue
        if line.startswith('"""') or line.startswith('r"""'):
            in_doc = quotes == 1
            continue
        if not line or line.startswith(("#", "import ", "from ")) or re.fullmatch(r"[\[\](){},:]+", line):
            continue
        out.append((i, line))
    return out


def test_no_run_of_six_lines_is_written_twice_in_the_core_or_the_adapters():
    """Node-schema boilerplate (inputs, tooltips, defaults) aside."""
    seen = defaultdict(list)
    for path in python_files("productscene", "nodes"):
        lines = meaningful_lines(path)
        for k in range(len(lines) - 5):
            window = [text for _, text in lines[k:k + 6]]
            if sum(bool(SCHEMA.match(t)) for t in window) >= 3:
                continue
            seen[tuple(window)].append(f"{path.relative_to(ROOT)}:{lines[k][0]}")
    repeats = {places[0]: places[1:] for places in seen.values() if len(places) > 1}
    assert not repeats, "\n".join(f"{first} again at {', '.join(rest)}" for first, rest in repeats.items())


def test_every_script_imports():
    """Each script's imports resolve (``--help`` runs them and exits): a name the scripts use can
    not be removed from the core unnoticed (the demo once called a deleted fidelity function)."""
    import subprocess
    import sys
    for script in ("demo.py",):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
