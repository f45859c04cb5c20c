"""Layering (docs/ARCHITECTURE.md): the policy, its distribution and the loss depend on ``core``
only, never on the env, the engine, the trainer or the CLI, so the one mask/action layout they
read is defined below them (``core.masks``, ``core.spec``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import esper_soa

ROOT = Path(esper_soa.__file__).parent


def _file(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for path in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(module: str) -> set[str]:
    """The ``esper_soa`` modules one module imports (anywhere in it, function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n.startswith("esper_soa.") and _file(n) is not None}
    return out


def closure(module: str) -> set[str]:
    """Every ``esper_soa`` module ``module`` reaches through imports (package ``__init__``s aside:
    the top-level package re-exports the engine for users, it is not a dependency)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [n for n in _imports(m) if _file(n).name != "__init__.py"]
    return seen


@pytest.mark.parametrize("module", ["esper_soa.agents.distribution", "esper_soa.agents.policy", "esper_soa.agents.loss"])
def test_policy_loss_and_distribution_import_nothing_above_core(module: str) -> None:
    reached = closure(module)
    assert "esper_soa.core.masks" in closure("esper_soa.agents.distribution")  # the check sees imports
    above = sorted(m for m in reached if m.startswith(("esper_soa.env", "esper_soa.training", "esper_soa.cli")))
    assert not above, f"{module} reaches {above}"
