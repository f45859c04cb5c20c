"""Shared benchmark plumbing: measurements of one run are kept per module so the last test of
each module can assert *ratios* (compiled vs reference, wrapper vs engine) measured side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_RESULTS: dict[str, dict[tuple, float]] = {}


@pytest.fixture
def results(request: pytest.FixtureRequest) -> dict[tuple, float]:
    """Mean seconds per call by (variant, size), shared by the tests of one module."""
    return _RESULTS.setdefault(request.module.__name__, {})


def record(benchmark, results: dict, key: tuple, n_envs: int) -> None:
    """Store the mean and the env-steps/s of the benchmark that just ran."""
    mean = benchmark.stats.stats.mean
    results[key] = mean
    benchmark.extra_info["env_steps_per_s"] = n_envs / mean


def require(results: dict, *keys: tuple) -> None:
    missing = [k for k in keys if k not in results]
    if missing:
        pytest.skip(f"run the whole module: missing measurements {missing}")


def print_rates(results: dict, sizes: tuple[int, ...], variants: tuple[str, ...] = ("reference", "eager", "compiled")) -> None:
    """One line per size: env-steps/s of each variant and compiled/reference."""
    for e in sizes:
        rates = "  ".join(f"{v} {e / results[(v, e)]:,.0f}" for v in variants)
        print(f"E={e}: {rates} env-steps/s; compiled/reference {results[('reference', e)] / results[('compiled', e)]:.0f}x")
