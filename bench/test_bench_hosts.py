"""Host-epoch throughput: the batched-hosts backend vs a per-env loop over the same small hosts.

One "host epoch" is what ``BatchedHostsDynamics.advance`` does for all E envs: ``MB`` training
minibatches, then validation with every seed on/off counterfactual. The per-env baseline runs the
readable reference (``train_single_host`` + ``evaluate_single_host``, one forward per
counterfactual variant, as an object-per-env implementation does) env after env, on the same
data order and the same seeded state. Timings are the best of interleaved rounds (the CPU is
shared, so the minimum is the least noisy estimate); both figures and their ratio go to
``benchmark.extra_info``. Run: ``pytest bench/test_bench_hosts.py --benchmark-only``.
"""

from __future__ import annotations

import time

import pytest
import torch

from esper_soa.config import EngineConfig
from esper_soa.dynamics.hosts import (
    BatchedHostsDynamics,
    HostsConfig,
    env_params,
    evaluate_single_host,
    slot_setups,
    train_single_host,
)
from esper_soa.spec import AlphaAlgorithm as A
from esper_soa.spec import Blueprint as BP
from esper_soa.spec import Stage
from esper_soa.state import make_state

MB = 4  # minibatches per epoch: small, the ratio does not depend on it
HCFG = HostsConfig(minibatches_per_epoch=MB, minibatch_size=32, val_size=256, val_batch_size=256)
MIN_SPEEDUP_AT_32 = 5.0

# per-env slot patterns, cycled over envs: a typical mid-episode mix of stages and blueprints
PATTERNS = [
    [(Stage.BLENDING, BP.CONV_LIGHT, A.ADD, 0.5), (Stage.TRAINING, BP.ATTENTION, A.ADD, 0.0), None],
    [(Stage.FOSSILIZED, BP.NORM, A.ADD, 1.0), (Stage.HOLDING, BP.DEPTHWISE, A.GATE, 1.0), None],
    [None, (Stage.BLENDING, BP.BOTTLENECK, A.MULTIPLY, 0.3), (Stage.TRAINING, BP.CONV_SMALL, A.ADD, 0.0)],
    [(Stage.TRAINING, BP.CONV_HEAVY, A.ADD, 0.0), None, (Stage.HOLDING, BP.CONV_LIGHT, A.ADD, 1.0)],
]


def setup(n_envs: int) -> tuple[BatchedHostsDynamics, dict, dict]:
    cfg = EngineConfig(n_envs=n_envs, n_slots=3)
    dyn = BatchedHostsDynamics(cfg, HCFG)
    state = make_state(cfg).to_dict()
    sl = state["slots"]
    for e in range(n_envs):
        for s, spec in enumerate(PATTERNS[e % len(PATTERNS)]):
            if spec is not None:
                stage, bp, algo, alpha = spec
                sl["stage"][e, s], sl["blueprint"][e, s] = int(stage), int(bp)
                sl["algorithm"][e, s], sl["alpha"][e, s] = int(algo), alpha
    aux = dyn.refresh_seeds(state, dyn.init_aux(n_envs, 0))
    return dyn, state, aux


@pytest.mark.parametrize("n_envs", [8, 32, 128])
def test_host_epoch_throughput(benchmark, n_envs: int) -> None:
    dyn, state, aux = setup(n_envs)
    keys = dyn.param_keys()
    data = dyn.data
    order = dyn.data_order(aux)
    per_env = [
        (env_params(aux, e, keys), {k: aux["mom." + k][e].clone() for k in keys}, slot_setups(state, e))
        for e in range(n_envs)
    ]

    def batched() -> None:
        dyn.advance(state, aux)

    def loop() -> None:
        for e, (p, m, slots) in enumerate(per_env):
            batches = [(data.images(data.x_train[order[e, i]]), data.y_train[order[e, i]]) for i in range(MB)]
            p1, _, _ = train_single_host(p, m, slots, batches, HCFG)
            evaluate_single_host(p1, slots, dyn._val_x, dyn._val_y, HCFG)

    batched(), loop()  # warm-up (allocator, kernels)
    rounds = 2 if n_envs >= 128 else 4
    t_batched, t_loop = float("inf"), float("inf")
    for _ in range(rounds):  # interleaved so both see the same machine load
        t0 = time.perf_counter()
        batched()
        t1 = time.perf_counter()
        loop()
        t2 = time.perf_counter()
        t_batched, t_loop = min(t_batched, t1 - t0), min(t_loop, t2 - t1)
    speedup = t_loop / t_batched
    benchmark.extra_info.update(
        n_envs=n_envs,
        minibatches_per_epoch=MB,
        batched_epoch_s=round(t_batched, 4),
        per_env_loop_epoch_s=round(t_loop, 4),
        speedup=round(speedup, 2),
        batched_env_epochs_per_s=round(n_envs / t_batched, 1),
        per_env_loop_env_epochs_per_s=round(n_envs / t_loop, 1),
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(batched, rounds=rounds, iterations=1)
    print(f"E={n_envs}: batched {t_batched:.3f}s, per-env loop {t_loop:.3f}s, speedup {speedup:.1f}x")
    if n_envs == 32:
        assert speedup >= MIN_SPEEDUP_AT_32, f"batched only {speedup:.1f}x faster than the per-env loop at E=32"
