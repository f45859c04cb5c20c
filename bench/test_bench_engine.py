"""Issue 3 gate: the full engine step (dynamics + reward + transitions) at E = 1024, 4096, 65536,
compiled vs eager vs the per-env reference loop, in one run; memory per env reported.

Run: ``pytest bench/test_bench_engine.py -s``. Targets (2-core CPU):
>= 1,000,000 env-steps/s compiled at E = 65536 and >= 100x the reference at E = 4096.
The reference loop runs the per-env lifecycle + reward + masks + observation on metrics that
the batched surrogate produced beforehand (its dynamics cost is not charged to it), starting every
round from the compiled engine's own mid-episode state (the same stage mix, the same work).
"""

from __future__ import annotations

import resource

import pytest
import torch

from bench.conftest import bench_reference, print_rates, record, require
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.env.engine import Engine

SIZES = (1024, 4096, 65536)


def warm_engine(n_envs: int, compile: bool, device: str = "cpu", threads: int = 0) -> tuple[Engine, list[dict]]:
    """An engine 20 random masked steps into its episodes, and 8 valid actions for the next step.
    ``threads`` 0 (every core torch uses: these gates assume cores of their own; the noisy bench
    passes the library default)."""
    engine = Engine(EngineConfig(n_envs=n_envs, n_slots=3, compile=compile, validate_actions=False, device=device,
                                 threads=threads))
    engine.reset()
    generator = torch.Generator(device=engine.device).manual_seed(0)
    for _ in range(20):  # a realistic stage mix (and the compile, if any)
        engine.step(sample_masked_action(engine.masks, generator))
    actions = [sample_masked_action(engine.masks, generator) for _ in range(8)]
    return engine, actions


def state_bytes_per_env(engine: Engine) -> float:
    tensors = list(engine.state.values(include_nested=True, leaves_only=True)) + list(engine.aux.values())
    return sum(t.numel() * t.element_size() for t in tensors) / engine.cfg.n_envs


@pytest.mark.parametrize("n_envs", SIZES)
@pytest.mark.parametrize("variant", ["reference", "eager", "compiled"])
def test_full_step(benchmark, results, variant: str, n_envs: int) -> None:
    if variant == "reference":
        engine, actions = warm_engine(n_envs, compile=False)
        metrics, _ = engine.dynamics.advance(engine.lifecycle_state, engine.aux)
        bench_reference(benchmark, results, engine.cfg, engine.lifecycle_state, actions[0], metrics, 1 if n_envs > 4096 else 6)
    else:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        engine, actions = warm_engine(n_envs, compile=variant == "compiled")
        it = iter(range(10**9))
        benchmark.pedantic(lambda: engine.step(actions[next(it) % 8]), rounds=10, iterations=1, warmup_rounds=1)
        benchmark.extra_info["state_bytes_per_env"] = state_bytes_per_env(engine)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        benchmark.extra_info["peak_rss_growth_bytes_per_env"] = max(rss1 - rss0, 0) * 1024 / n_envs
    record(benchmark, results, (variant, n_envs), n_envs)


def test_targets(results) -> None:
    require(results, *[(v, e) for v in ("reference", "eager", "compiled") for e in SIZES])
    print_rates(results, SIZES)
    assert results[("reference", 4096)] / results[("compiled", 4096)] >= 100
    assert 65536 / results[("compiled", 65536)] >= 1_000_000
