"""Issue 17 gate: the full engine step with CPU-bound neighbour processes on the same cores.

Users run the engine next to a policy update, a data loader or other jobs. This module times the
same step as ``test_bench_engine.py`` (reference loop, eager, compiled; engines built with the
config defaults, so the compiled step uses ``EngineConfig.threads``) while 1 and then 2
pure-Python busy loops run beside it. The engines are built and compiled before the neighbours
start (a cold compile under load would take many minutes), and every neighbour is stopped when
its test ends, also on failure, and ends itself after 10 minutes regardless.

Run: ``pytest bench/test_bench_noisy.py -s``. Gates, with neighbours: compiled
>= eager at every E, and compiled >= 50x the reference at E = 4096.
"""

from __future__ import annotations

import pytest

from bench.conftest import bench_reference, neighbours, print_rates, record, require
from bench.test_bench_engine import SIZES, warm_engine
from esper_soa.core.config import EngineConfig

LOADS = (1, 2)  # neighbour processes
_ENGINES: dict[tuple[bool, int], tuple] = {}


def engine_for(n_envs: int, compile: bool) -> tuple:
    """One warm engine per (compile, E), built once and shared by both loads."""
    if (compile, n_envs) not in _ENGINES:
        _ENGINES[(compile, n_envs)] = warm_engine(n_envs, compile=compile, threads=EngineConfig().threads)
    return _ENGINES[(compile, n_envs)]


def loaded(results: dict, load: int) -> dict:
    """The measurements taken with ``load`` neighbours (one dict per load, keyed as in the
    engine bench, so ``print_rates`` reads them)."""
    return results.setdefault(("neighbours", load), {})


@pytest.mark.parametrize("n_envs", SIZES)
@pytest.mark.parametrize("variant", ["reference", "eager", "compiled"])
@pytest.mark.parametrize("load", LOADS)
def test_full_step_with_neighbours(benchmark, results, load: int, variant: str, n_envs: int) -> None:
    engine, actions = engine_for(n_envs, compile=variant == "compiled")
    out = loaded(results, load)
    with neighbours(load):
        if variant == "reference":
            metrics, _ = engine.dynamics.advance(engine.lifecycle_state, engine.aux)
            bench_reference(benchmark, out, engine.cfg, engine.lifecycle_state, actions[0], metrics, 1 if n_envs > 4096 else 4)
        else:
            it = iter(range(10**9))
            benchmark.pedantic(lambda: engine.step(actions[next(it) % 8]), rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["neighbours"] = load
    record(benchmark, out, (variant, n_envs), n_envs)


@pytest.mark.parametrize("load", LOADS)
def test_targets_with_neighbours(results, load: int) -> None:
    out = loaded(results, load)
    require(out, *[(v, e) for v in ("reference", "eager", "compiled") for e in SIZES])
    print(f"\nwith {load} CPU-bound neighbour(s):")
    print_rates(out, SIZES)
    slower = [e for e in SIZES if out[("compiled", e)] > out[("eager", e)]]
    assert not slower, f"compiled slower than eager at E = {slower} with {load} neighbour(s)"
    assert out[("reference", 4096)] / out[("compiled", 4096)] >= 50
