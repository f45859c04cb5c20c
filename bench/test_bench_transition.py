"""Issue 2 gate: the lifecycle transition (ops + tick + record + masks + observation) at
E = 64, 1024, 4096, S = 3, eager vs compiled vs the per-env reference loop, in one run.

Run: ``pytest bench/test_bench_transition.py``. Target (2-core CPU): compiled
>= 100x reference at E = 4096.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.conftest import bench_reference, print_rates, record, require
from esper_soa.core.config import EngineConfig
from esper_soa.core.lifecycle import record_epoch
from esper_soa.core.masks import compute_masks
from esper_soa.core.spec import SpecTables
from esper_soa.core.state import as_dict, make_state
from esper_soa.core.step import transition
from tests.helpers import random_action, random_metrics

SIZES = (64, 1024, 4096)


def _inputs(n_envs: int):
    cfg = EngineConfig(n_envs=n_envs, n_slots=3)
    tables = SpecTables(cfg.topology, cfg.n_slots)
    rng = np.random.default_rng(0)
    state = record_epoch(as_dict(make_state(cfg)), random_metrics(rng, n_envs, 3))
    for _ in range(30):  # a realistic stage mix
        action = random_action(rng, compute_masks(state, tables, cfg), 3)
        state, _ = transition(state, action, random_metrics(rng, n_envs, 3), tables, cfg)
    action = random_action(rng, compute_masks(state, tables, cfg), 3)
    return cfg, tables, state, action, random_metrics(rng, n_envs, 3)


@pytest.mark.parametrize("n_envs", SIZES)
@pytest.mark.parametrize("variant", ["reference", "eager", "compiled"])
def test_transition(benchmark, results, variant: str, n_envs: int) -> None:
    cfg, tables, state, action, metrics = _inputs(n_envs)
    if variant == "reference":
        bench_reference(benchmark, results, cfg, state, action, metrics, 6 if n_envs >= 1024 else 10)
    else:
        fn = torch.compile(transition, fullgraph=True) if variant == "compiled" else transition
        fn(state, action, metrics, tables, cfg)  # warm-up / compile
        benchmark.pedantic(lambda: fn(state, action, metrics, tables, cfg), rounds=20, iterations=1, warmup_rounds=2)
    record(benchmark, results, (variant, n_envs), n_envs)


def test_ratio_compiled_vs_reference(results) -> None:
    keys = [(v, e) for v in ("reference", "eager", "compiled") for e in SIZES]
    require(results, *keys)
    print_rates(results, SIZES)
    assert results[("reference", 4096)] / results[("compiled", 4096)] >= 100
