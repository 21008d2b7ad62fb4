"""The code follows the pipeline the README's table lays out: every module in it, imports only from above."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "jaxscale"


def _stages() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## The code, stage by stage", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and ".py" in line]
    return [name for row in rows for name in re.findall(r"`(\w+)\.py`", row.split("|")[2])]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(jaxscale modules imported at the top, those imported inside functions) by one source file."""
    tree = ast.parse(path.read_text())
    top, inner = set(), set()
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = set()
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxscale"):
            parts = node.module.split(".")
            names = {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxscale.")}
        (top if id(node) in module_level else inner).update(names)
    return top, inner


def test_every_module_has_a_stage_and_imports_only_from_the_stages_above():
    order = _stages()
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert sorted(order) == sorted(modules), "add each module to the README's stage table, once"
    upward, inner = [], []
    for name in order:
        top, lazy = _imports(SRC / f"{name}.py")
        upward += [f"{name} -> {d}" for d in (top | lazy) - {name} if order.index(d) > order.index(name)]
        if name != "cli":
            inner += [f"{name} -> {d}" for d in lazy]
    assert not upward, f"imports from a later stage: {upward}"
    assert not inner, f"imports inside functions (only cli.py sets up the process first): {inner}"


def test_the_check_sees_imports_at_the_top_and_inside_functions(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import jaxscale.records\nfrom jaxscale.cli import main\n\n\ndef f():\n    from jaxscale import sweep\n")
    assert _imports(planted) == ({"records", "cli"}, {"sweep"})
