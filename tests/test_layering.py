"""Imports flow one way: cli → trainers → adapterdb ← storage (trainers may use storage).

The public facade (`adapterdb/__init__.py`, `api.py`, `integrations.py`) sits above every
layer, as the CLI does, and imports the lower layers lazily so `import adapterdb` stays cheap.
Every other module of the core must stay free of the store, the trainers and the CLI, so each
kernel can be tested on plain tensors; this test reads every import statement, including the
ones inside functions, so a lazy import cannot slip a cycle in either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FACADE = {"adapterdb/__init__.py", "adapterdb/api.py", "adapterdb/integrations.py"}
# folder -> the adapterdb subpackages its modules may not import
FORBIDDEN = {
    "adapterdb": ("storage", "trainers", "cli"),
    "storage": ("trainers", "cli"),
    "trainers": ("cli",),
}


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_flow_one_way(folder: str) -> None:
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in FACADE:
            continue
        for name in _imported(path):
            parts = name.split(".")
            if parts[0] == "adapterdb" and len(parts) > 1 and parts[1] in FORBIDDEN[folder]:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The parser finds imports inside functions too (a lazy import is still a dependency)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from adapterdb.storage.store import Store\n")
    assert "adapterdb.storage.store" in _imported(module)
