"""Layering rules that keep the package importable piece by piece (issue 21): configs are plain data."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_configs_import_nothing_from_nexus_jax():
    offenders = {p.name: sorted(m for m in _imports(p) if m.split(".")[0] == "nexus_jax")
                 for p in sorted((ROOT / "configs").glob("*.py"))}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"configs must be plain data, but import: {offenders}"
