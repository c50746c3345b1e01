"""The code's shape: modules of at most 600 lines, no module importing another's private names,
no import cycles between modules (lazy imports inside functions included), and the README's
code layout naming every subpackage there is."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autointerp"
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every autointerp import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("autointerp")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("autointerp"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in known else (base, alias.name))
    return out


def test_every_module_has_at_most_600_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def module_aliases(name: str, path: Path, known: dict[str, Path]) -> dict[str, str]:
    """Local names bound to other autointerp modules (`from autointerp.labels import decision as G`)."""
    bound = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autointerp"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in known:
                    bound[alias.asname] = alias.name
    return {local: module for local, module in bound.items() if module != name}


def test_no_module_imports_another_modules_private_names():
    known = modules()
    private = []
    for name, path in known.items():
        for module, taken in imports(name, path, known):
            if module != name and taken and taken.startswith("_") and not taken.startswith("__"):
                private.append(f"{name} imports {module}.{taken}")
        aliases = module_aliases(name, path, known)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert not private, private


def test_no_import_cycles():
    known = modules()
    graph = {name: {m for m, _ in imports(name, path, known) if m in known and m != name}
             for name, path in known.items()}
    # a package's __init__ importing its own submodules is how a package exposes them, not a cycle
    graph = {name: {m for m in deps if not (m.startswith(name + ".") and known[name].name == "__init__.py")}
             for name, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_readme_layout_names_every_subpackage():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Code layout", 1)[1].split("```", 2)[1]
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert subpackages and all(f"  {name}/" in layout for name in subpackages), (subpackages, layout)
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    missing = [name for name in top if f"  {name}" not in layout]
    assert not missing, f"README code layout misses {missing}"


def test_the_readme_is_a_door_not_a_log():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme) <= 20_000, f"README.md has {len(readme):,} characters: move detail to docs/"
