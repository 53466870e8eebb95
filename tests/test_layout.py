"""The package's layout rules (docs/architecture.md): who may import whom, and its size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_inspect"
SHARED = {"_validation", "errors"}
#: What each part may import from the library besides itself: features build on core and backends.
ALLOWED = {
    "core": SHARED,
    "backends": SHARED | {"core"},
    **{
        feature: SHARED | {"core", "backends"}
        for feature in ("monitors", "health", "shapes", "probes", "record", "overview", "hydra")
    },
}
#: ModuleMonitor, the base of every module-hooking callback, is where core's rows meet the sinks.
EXCEPTIONS = {"core/monitor.py": {"backends"}}
#: The issue's limit on the package's Python, blank lines, comments and docstrings included.
MAX_LINES = 8_000


def _library_imports(path: Path) -> set[str]:
    """The first component under ``lightning_inspect`` of every import in ``path``, nested ones too."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "lightning_inspect" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_features_depend_on_core_and_backends_only(part: str) -> None:
    files = sorted((PACKAGE / part).glob("*.py"))
    assert files, part
    for path in files:
        reached = _library_imports(path) - {part}
        allowed = ALLOWED[part] | EXCEPTIONS.get(f"{part}/{path.name}", set())
        assert reached <= allowed, (
            f"{path.relative_to(PACKAGE)} imports {sorted(reached - allowed)}"
        )


def test_every_subpackage_is_a_known_part() -> None:
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")} - {"conf"}
    assert packages == set(ALLOWED)


def test_the_package_stays_under_its_line_budget() -> None:
    lines = sum(len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py"))
    assert lines <= MAX_LINES, f"{lines} lines of Python in lightning_inspect/ (limit {MAX_LINES})"
