"""Shared benchmark plumbing: measurements of one run are kept per module so the last test of
each module can assert *ratios* (compiled vs reference, wrapper vs engine) measured side by side.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

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


def reference_round(cfg, state: dict, action: dict, metrics: dict) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(run, setup)`` for one round of the per-env reference: ``setup`` loads ``state`` (a batched
    variant's state), ``run`` does transition + masks + observation with ``action`` and ``metrics``."""
    from esper_soa.reference import ReferenceEngine
    from tests.helpers import to_numpy

    ref = ReferenceEngine(cfg)
    np_state, np_action, np_metrics = to_numpy(state), to_numpy(action), to_numpy(metrics)

    def run() -> None:
        ref.transition(np_action, np_metrics)
        ref.masks()
        ref.observation()

    def setup() -> None:
        ref.load_state(np_state)

    return run, setup


def bench_reference(benchmark, results: dict, cfg, state: dict, action: dict, metrics: dict, rounds: int) -> None:
    """Time the per-env reference (transition + masks + observation) on the batched variants' work.

    Every round starts from ``state`` (the batched variant's own mid-episode state) with the same
    action and metrics. The GC stays on, as in the original system; its full passes land in every
    other round at E = 4096, so ``rounds`` should be even. The GC-off mean, the figure most
    favourable to the loop, goes to ``results[("reference_nogc", E)]``.
    """
    run, setup = reference_round(cfg, state, action, metrics)
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    results[("reference_nogc", cfg.n_envs)] = time_without_gc(run, setup, rounds=2)
    benchmark.extra_info["mean_s_gc_off"] = results[("reference_nogc", cfg.n_envs)]


@contextmanager
def neighbours(count: int, max_seconds: float = 600.0) -> Iterator[None]:
    """``count`` CPU-bound neighbour processes (pure-Python busy loops) for the duration of the
    block: the load a policy update or another job puts on a shared machine. They are killed when
    the block exits (also on an exception); each one also ends itself after ``max_seconds`` or as
    soon as this process is gone (its parent changes), so none outlives a killed benchmark."""
    code = (
        f"import os, time\nend = time.monotonic() + {max_seconds}\n"
        f"while time.monotonic() < end and os.getppid() == {os.getpid()}:\n"
        "    for _ in range(100_000):\n        pass\n"
    )
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", code]))
        time.sleep(0.5)  # let the scheduler see them running
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


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
