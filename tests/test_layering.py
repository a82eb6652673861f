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


MODELS_MAY_IMPORT = ("nexus_jax.layers", "nexus_jax.sharding", "nexus_jax.models", "configs")
FIRST_PARTY = ("nexus_jax", "configs", "conversion", "launch", "tests", "benchmarks", "scripts")
FOREIGN = ("torch", "transformers", "diffusers", "safetensors")  # foreign layouts are conversion's job


def _model_imports(path: Path) -> set[str]:
    """Dotted names a module imports, ``from nexus_jax import x`` counted as ``nexus_jax.x`` (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "nexus_jax":
                names.update(f"nexus_jax.{a.name}" for a in node.names)
            else:
                names.add(node.module)
    return names


def _allowed_in_models(name: str) -> bool:
    top = name.split(".")[0]
    if top in FOREIGN:
        return False
    if top not in FIRST_PARTY:
        return True  # jax, flax, numpy, the standard library
    return any(name == a or name.startswith(a + ".") for a in MODELS_MAY_IMPORT)


def test_models_import_only_layers_sharding_configs_and_models():
    files = sorted((ROOT / "nexus_jax" / "models").rglob("*.py"))
    assert len(files) > 20, "expected the model package"
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _model_imports(p) if not _allowed_in_models(m))
                 for p in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"nexus_jax/models may import only {MODELS_MAY_IMPORT} and third-party numerics: {offenders}"


def test_models_layering_check_catches_upward_imports():
    assert not _allowed_in_models("nexus_jax.diffusion.maskgit")
    assert not _allowed_in_models("nexus_jax.nexus")
    assert not _allowed_in_models("conversion.tables.vae")
    assert not _allowed_in_models("torch")
    assert _allowed_in_models("nexus_jax.models.rows") and _allowed_in_models("configs.mar")
    assert _allowed_in_models("nexus_jax.sharding") and _allowed_in_models("jax.numpy")
