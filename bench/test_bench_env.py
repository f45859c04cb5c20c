"""Issue 4 gate: EsperEnv.step overhead over the raw engine step (E = 1024, 65536) and
TorchRL Collector frames/s with the random masked policy, in one run.

Run: ``pytest bench/test_bench_env.py -s``. Target: the wrapper adds < 25% at E = 65536.
``ESPER_BENCH_COMPILE=0`` measures against the eager engine (the wrapper's cost is a fixed
per-call overhead, so this is the stricter ratio; a cold compile at E = 65536 takes minutes).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from bench.conftest import record, require
from esper_soa.agents.baselines import RandomMaskedPolicy
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.env.esper_env import EsperEnv, action_td
from esper_soa.training.rollout import run_collector

SIZES = (1024, 65536)
COMPILE = os.environ.get("ESPER_BENCH_COMPILE", "1") != "0"


@functools.cache
def _env(n_envs: int) -> tuple[EsperEnv, list[torch.Tensor]]:
    """One env per size, shared by both variants (one compile per size)."""
    env = EsperEnv(EngineConfig(n_envs=n_envs, compile=COMPILE, validate_actions=False))
    env.reset()
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        env.engine.step(sample_masked_action(env.engine.masks, generator))
    return env, [sample_masked_action(env.engine.masks, generator) for _ in range(8)]


@pytest.mark.parametrize("n_envs", SIZES)
@pytest.mark.parametrize("variant", ["engine", "env"])
def test_step(benchmark, results, variant: str, n_envs: int) -> None:
    env, actions = _env(n_envs)
    tds = [action_td(a, [n_envs], env.device) for a in actions]  # ("action", head) views of [E, 8]
    it = iter(range(10**9))
    if variant == "engine":
        fn = lambda: env.engine.step(actions[next(it) % 8])  # noqa: E731
    else:
        fn = lambda: env.step(tds[next(it) % 8])  # noqa: E731
    benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=2)
    record(benchmark, results, (variant, n_envs), n_envs)


def test_collector_random_policy(benchmark) -> None:
    env = EsperEnv(EngineConfig(n_envs=1024, max_epochs=50, compile=COMPILE, validate_actions=False))
    stats = benchmark.pedantic(
        lambda: run_collector(env, RandomMaskedPolicy(0), 1024 * 50, 1024 * 100), rounds=1, iterations=1
    )
    benchmark.extra_info["frames_per_s"] = stats.frames_per_second
    print(f"Collector + random masked policy, E=1024: {stats.frames_per_second:,.0f} frames/s")


def test_wrapper_overhead(results) -> None:
    require(results, *[(v, e) for v in ("engine", "env") for e in SIZES])
    for e in SIZES:
        print(f"E={e}: EsperEnv.step / engine.step = {results[('env', e)] / results[('engine', e)]:.3f}")
    assert results[("env", 65536)] / results[("engine", 65536)] < 1.25
