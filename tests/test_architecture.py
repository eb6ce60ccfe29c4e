"""The package's folders follow the data flow, and imports only go down it (docs/architecture.md).

Read with `ast`, so that local imports (the package imports openpi, orbax and torch lazily) count too.
"""

import ast
import pathlib

from helpers import REPO

PACKAGE = REPO / "openpi_merge_plugin"
# Bottom to top. A module may import from its own layer and from layers below it, never from one above.
# `cli` and `openpi_glue` are two thin layers side by side on top: neither imports the other.
LAYERS = [
    {"errors", "options"},
    {"lora"},
    {"checkpoint"},
    {"merge"},
    {"serving"},
    {"formats"},
    {"pipeline"},
    {"checks"},
    {"cli", "openpi_glue", "bootstrap"},
]
PEERS_APART = {("cli", "openpi_glue"), ("openpi_glue", "cli"), ("cli", "bootstrap"), ("bootstrap", "cli")}


def _layer(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def _unit(module: str) -> str | None:
    """The folder (or top-level module) of a dotted module name inside the package; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "openpi_merge_plugin" else None


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the package's own modules in a file, local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("openpi_merge_plugin")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("openpi_merge_plugin"):
            if node.module == "openpi_merge_plugin":  # `from openpi_merge_plugin import x`: a module or a root name
                found += [
                    (node.lineno, f"openpi_merge_plugin.{a.name}" if _is_module(a.name) else node.module)
                    for a in node.names
                ]
            else:
                found.append((node.lineno, node.module))
    return found


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_belongs_to_a_layer():
    units = {_unit(_module_name(p)) for p in _modules()}
    known = set().union(*LAYERS)
    assert units <= known, f"modules outside the layers of docs/architecture.md: {sorted(units - known)}"


def test_imports_only_go_down_the_data_flow():
    wrong = []
    for path in _modules():
        own = _unit(_module_name(path))
        for line, target in _imports(path):
            other = _unit(target)
            if other is None or other == own:
                continue
            if _layer(other) > _layer(own) or (own, other) in PEERS_APART:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({own}) imports {target} ({other})")
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "openpi_merge_plugin" / "lora" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "def f():\n    from openpi_merge_plugin.cli import main\n    from openpi_merge_plugin import checks\n"
    )
    targets = [_unit(t) for _, t in _imports(bad)]
    assert targets == ["cli", "checks"]
    assert all(_layer(t) > _layer("lora") for t in targets)


def _module_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (local imports included; `from pkg import mod` is `pkg.mod`)."""

    def dotted(path: pathlib.Path) -> str:
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    names = {dotted(p) for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        me, targets = dotted(path), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    targets.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module)
        graph[me] = {t for t in targets if t in names and t != me}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> list[str] | None:
        if module in trail:
            return [*trail[trail.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            if found := visit(target, [*trail, module]):
                return found
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_no_module_imports_itself_back():
    """No import circle between the package's modules, local imports included."""
    circle = _circle(_module_graph(PACKAGE))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_checker_sees_a_circle(tmp_path):
    lora = tmp_path / "openpi_merge_plugin" / "lora"
    lora.mkdir(parents=True)
    (lora / "a.py").write_text("def f():\n    from openpi_merge_plugin.lora import b\n")
    (lora / "b.py").write_text("from openpi_merge_plugin.lora.a import f\n")
    graph = _module_graph(tmp_path / "openpi_merge_plugin")
    assert _circle(graph) == ["openpi_merge_plugin.lora.a", "openpi_merge_plugin.lora.b", "openpi_merge_plugin.lora.a"]


def test_checkpoint_holds_no_format_code():
    """checkpoint/ reads and writes checkpoints and keeps the output rules; what a format's files hold (PI0Pytorch's or
    LeRobot's tensor names, config.json, processors) is formats/'s."""
    for path in (PACKAGE / "checkpoint").glob("*.py"):
        text = path.read_text()
        for word in ("PI0Pytorch", "paligemma_with_expert", "config.json", "policy_preprocessor", "TensorSpec"):
            assert word not in text, f"{path.relative_to(REPO)} mentions {word!r}: format code belongs in formats/"
