"""Issue 5 gate: end-to-end PPO training throughput (collect + GAE + PPO update) at E = 1024
with the MLP policy, compiled engine vs eager engine, in one run.

Run: ``pytest bench/test_bench_train.py -s``. Target: >= 25,000 env-steps/s end
to end with the compiled engine. One measured call is one full update: 1024 envs x 32 steps
collected, GAE, 4 PPO epochs x 4 minibatches (no target-KL early stop, so every round does the
same work); the 5 timed updates (steps 160..320 of 150-step episodes) include one episode end.
Threads: ``ESPER_BENCH_THREADS`` (default 1, as the other CPU benchmarks; on a shared 2-core
machine a second OpenMP thread mostly spins).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.conftest import record, require
from esper_soa.core.config import EngineConfig
from esper_soa.training.train import TrainConfig, Trainer

N_ENVS = 1024
ROLLOUT = 32
MAX_EPOCHS = 150
TARGET = 25_000


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ESPER_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def _trainer(compile: bool) -> Trainer:
    engine = EngineConfig(n_envs=N_ENVS, max_epochs=MAX_EPOCHS, compile=compile, validate_actions=False)
    cfg = TrainConfig(engine=engine, rollout_len=ROLLOUT, target_kl=None, progress=False, updates=10**6)
    return Trainer(cfg)


@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_train_update(benchmark, results, variant: str) -> None:
    trainer = _trainer(compile=variant == "compiled")
    # warm up past the first episode end, so the compiled step *and* the compiled partial reset
    # (first called with a stepped state) are built before timing
    for _ in range(MAX_EPOCHS // ROLLOUT + 1):
        trainer.step()
    benchmark.pedantic(trainer.step, rounds=5, iterations=1)
    frames = N_ENVS * ROLLOUT
    record(benchmark, results, (variant,), frames)
    benchmark.extra_info.update(frames_per_update=frames, threads=torch.get_num_threads())
    print(f"{variant}: {frames / results[(variant,)]:,.0f} env-steps/s end to end (E={N_ENVS}, {ROLLOUT} steps/update)")


def test_compiled_speedup_and_target(benchmark, results) -> None:
    require(results, ("eager",), ("compiled",))
    frames = N_ENVS * ROLLOUT
    compiled, eager = frames / results[("compiled",)], frames / results[("eager",)]
    benchmark.extra_info.update(compiled_sps=compiled, eager_sps=eager, compiled_over_eager=compiled / eager)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"end-to-end training: compiled {compiled:,.0f} env-steps/s, eager {eager:,.0f}, "
          f"ratio {compiled / eager:.2f}")
    assert compiled >= TARGET
