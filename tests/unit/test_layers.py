"""The layering of DESIGN.md section 1: no layer imports upward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "flashio": {"prefect", "prefect_dask", "datasets", "transformers", "tasks", "flows"},
    "tasks": {"flows"},
    "flows": {"torch", "numpy", "safetensors"},  # flows order tasks; no tensor code
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    files = [p for p in (ROOT / package).rglob("*.py")]
    if package == "flashio":
        assert files, "flashio has no modules?"
    bad = {}
    for f in files:
        hit = imported_modules(f) & FORBIDDEN[package]
        if hit:
            bad[str(f.relative_to(ROOT))] = sorted(hit)
    assert not bad, f"layer violations (see DESIGN.md section 1): {bad}"


def test_boto3_only_in_the_s3_backend():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "flashio").rglob("*.py")
             if {"boto3", "botocore"} & imported_modules(p)]
    assert all(u.endswith("registry/s3.py") for u in users), users


def test_the_checker_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import prefect.flows\nfrom transformers import AutoModel\ndef f():\n    import datasets\n")
    assert imported_modules(f) == {"prefect", "transformers", "datasets"}
