"""Shared benchmark plumbing: measurements of one run are kept per module so the last test of
each module can assert *ratios* (compiled vs reference, wrapper vs engine) measured side by side.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
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


def time_without_gc(run: Callable[[], object], setup: Callable[[], object], rounds: int) -> float:
    """Mean seconds of ``run`` (``setup`` untimed before each round) with Python's cyclic GC off:
    the per-env reference's cost without its garbage-collection passes, the figure most
    favourable to it. (With the GC on, a full collection lands in every other round at E = 4096.)"""
    times = []
    for _ in range(rounds):
        setup()
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return sum(times) / len(times)


def require(results: dict, *keys: tuple) -> None:
    missing = [k for k in keys if k not in results]
    if missing:
        pytest.skip(f"run the whole module: missing measurements {missing}")


def print_rates(results: dict, sizes: tuple[int, ...], variants: tuple[str, ...] = ("reference", "eager", "compiled")) -> None:
    """One line per size: env-steps/s of each variant and compiled/reference (with and without
    the reference's garbage collection)."""
    for e in sizes:
        rates = "  ".join(f"{v} {e / results[(v, e)]:,.0f}" for v in variants)
        ratio = results[("reference", e)] / results[("compiled", e)]
        no_gc = results[("reference_nogc", e)] / results[("compiled", e)]
        print(f"E={e}: {rates} env-steps/s; compiled/reference {ratio:.0f}x ({no_gc:.0f}x with the reference's GC off)")
