"""Layers import only downward: phase 1 (pipeline) never imports phase 2 (rlhf), at module level or inside a
function; the dispatch that needs both lives in runner."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedbiscuit"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_phase_one_never_imports_phase_two():
    found = {m for m in _imports(SRC / "pipeline.py") if "rlhf" in m}
    assert not found, f"pipeline.py imports {found}: phase 2 sits above it"


def test_only_the_top_layer_imports_the_runner():
    users = [p.name for p in SRC.rglob("*.py") if any("runner" in m for m in _imports(p))]
    assert users == ["cli.py"]
