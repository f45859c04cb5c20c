"""Full engine step on the surrogate: episode bookkeeping, determinism, divergence, compile."""

from __future__ import annotations

import os

import pytest
import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.core.spec import HEAD_NAMES, PRUNABLE_STAGES, Op, Stage
from esper_soa.dynamics.surrogate import SurrogateConfig
from esper_soa.env.engine import Engine

# Inductor's cold compile of the whole step takes minutes on 2 cores; "aot_eager" still traces
# the step with fullgraph=True (so graph breaks, .item() and data-dependent branches fail).
COMPILE_BACKEND = os.environ.get("ESPER_COMPILE_BACKEND", "aot_eager")


def _run(engine: Engine, steps: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    outs = [engine.reset()]
    for _ in range(steps):
        out = engine.step(sample_masked_action(engine.masks, generator))
        outs.append(out)
        if bool(out["done"].any()):
            engine.reset(out["done"].squeeze(-1))
    return outs


def test_episode_is_max_epochs_steps_and_truncates() -> None:
    engine = Engine(EngineConfig(n_envs=3, max_epochs=7))
    outs = _run(engine, 7)
    assert [bool(o["done"].all()) for o in outs[1:]] == [False] * 6 + [True]
    assert bool(outs[-1]["truncated"].all()) and not bool(outs[-1]["terminated"].any())
    # the epoch feature is the 1-based host epoch just trained (reset trains the first)
    assert outs[0]["observation"][:, 0].tolist() == pytest.approx([1 / 7] * 3)
    # the first observation is real: reset ran one host epoch
    assert bool((outs[0]["observation"][:, 2] > 0.1).all())
    assert engine.state["epoch"].tolist() == [0, 0, 0]  # auto-reset by _run after done


def test_episode_return_accumulates_rewards() -> None:
    engine = Engine(EngineConfig(n_envs=4, max_epochs=20))
    outs = _run(engine, 12)
    total = torch.stack([o["reward"].squeeze(-1) for o in outs[1:]]).sum(0)
    torch.testing.assert_close(engine.state["episode_return"], total)


def test_same_seed_same_trajectory_different_seed_differs() -> None:
    cfg = EngineConfig(n_envs=5, max_epochs=15, seed=11)
    a, b = _run(Engine(cfg), 20), _run(Engine(cfg), 20)
    for x, y in zip(a, b):
        for k in x.keys(True, True):
            assert torch.equal(x[k], y[k]), k
    c = _run(Engine(EngineConfig(n_envs=5, max_epochs=15, seed=12)), 20)
    assert not torch.equal(a[-1]["observation"], c[-1]["observation"])


def test_set_seed_restarts_streams() -> None:
    engine = Engine(EngineConfig(n_envs=3, seed=5))
    first = _run(engine, 4)
    engine.set_seed(5)
    again = _run(engine, 4)
    assert torch.equal(first[-1]["observation"], again[-1]["observation"])


def test_catastrophic_divergence_terminates_prunes_and_pays() -> None:
    scfg = SurrogateConfig(diverge_prob=1.0)
    engine = Engine(EngineConfig(n_envs=2, max_epochs=50, dynamics_config=scfg))
    engine.reset()
    generator = torch.Generator().manual_seed(0)
    out = engine.step(sample_masked_action(engine.masks, generator))
    assert bool(out["terminated"].all()) and bool(out["done"].all()) and not bool(out["truncated"].any())
    stage = engine.state["slots", "stage"]
    assert not bool(torch.isin(stage, torch.tensor([int(s) for s in PRUNABLE_STAGES])).any())
    calm = Engine(EngineConfig(n_envs=2, max_epochs=50, seed=0))
    calm.reset()
    ref = calm.step(sample_masked_action(calm.masks, torch.Generator().manual_seed(0)))
    assert bool((out["reward"] < ref["reward"] - 9.0).all())


def test_divergence_prunes_live_seeds() -> None:
    engine = Engine(EngineConfig(n_envs=2, max_epochs=50))
    engine.reset()
    wait = {h: torch.zeros(2, dtype=torch.int64) for h in HEAD_NAMES}
    germinate = {**wait, "op": torch.full((2,), int(Op.GERMINATE)), "blueprint": torch.full((2,), 1)}
    engine.step(germinate)
    assert engine.state["slots", "stage"][:, 0].tolist() == [int(Stage.GERMINATED)] * 2
    engine.dynamics.scfg = SurrogateConfig(diverge_prob=1.0)
    out = engine.step(wait)
    assert engine.state["slots", "stage"][:, 0].tolist() == [int(Stage.PRUNED)] * 2
    assert bool(out["terminated"].all())


def test_step_before_reset_and_bad_reset_rows_raise() -> None:
    engine = Engine(EngineConfig(n_envs=2))
    with pytest.raises(RuntimeError, match="before Engine.reset"):
        engine.step({})
    with pytest.raises(ValueError, match=r"bool tensor of shape \(2,\)"):
        engine.reset(torch.tensor([1, 0]))


def test_full_step_compiles_fullgraph_and_matches_eager() -> None:
    cfg = EngineConfig(n_envs=4, max_epochs=12, seed=3)
    eager = Engine(cfg)
    compiled = Engine(cfg)
    compiled._step_fn = torch.compile(compiled._step_fn, fullgraph=True, backend=COMPILE_BACKEND)
    compiled._reset_fn = torch.compile(compiled._reset_fn, fullgraph=True, backend=COMPILE_BACKEND)
    for x, y in zip(_run(eager, 15), _run(compiled, 15)):
        for k in x.keys(True, True):
            torch.testing.assert_close(x[k], y[k], msg=k)


def test_threads_knob_is_validated_and_reaches_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"EngineConfig.threads: expected an int >= 0"):
        EngineConfig(threads=-1)
    assert EngineConfig(threads=0).compile_options == {"cpp.threads": torch.get_num_threads()}
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    Engine(EngineConfig(n_envs=2, compile=True, threads=3))
    assert seen == [{"cpp.threads": 3}] * 2  # the step and the reset graphs


@pytest.mark.slow
def test_inductor_bakes_the_thread_count_into_the_kernel() -> None:
    """The thread policy rests on this: the compiled CPU kernel's OpenMP thread count is fixed
    when it is compiled (``torch.set_num_threads`` later does not change it), and 1 thread
    means no parallel region at all, hence no barriers."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(4096, 64)
    codes = {}
    for threads in (1, 2):
        torch._dynamo.reset()
        fn = torch.compile(lambda t: (t * 2 + 1).relu().sum(1), fullgraph=True, options={"cpp.threads": threads})
        _, (code, *_) = run_and_get_code(fn, x)
        codes[threads] = code
    assert "#pragma omp parallel" not in codes[1]
    assert "#pragma omp parallel num_threads(2)" in codes[2]
