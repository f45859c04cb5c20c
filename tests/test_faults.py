"""Fault injection (issue 18): a scheduled divergence is terminated with -10, its live seeds are
pruned, the other envs are untouched, the next reset is clean, no NaN appears anywhere after it,
and training goes on."""

from __future__ import annotations

import math

import pytest
import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import HEAD_NAMES, Blueprint, Op, Stage
from esper_soa.dynamics.faults import CLOCK, FaultInjectingDynamics
from esper_soa.dynamics.surrogate import SurrogateDynamics
from esper_soa.core.reward import DIVERGENCE_PENALTY
from esper_soa.env.engine import Engine
from esper_soa.training.train import TrainConfig, Trainer

E = 3
CFG = EngineConfig(n_envs=E, max_epochs=12, seed=5)
FAULT_STEP, FAULT_ENV = 4, 1


def _pair() -> tuple[Engine, Engine]:
    clean = Engine(CFG)
    faulty = Engine(CFG, FaultInjectingDynamics(SurrogateDynamics(CFG), E, [(FAULT_STEP, FAULT_ENV)]))
    return clean, faulty


def _action(op: Op, **heads: int) -> dict[str, torch.Tensor]:
    action = {h: torch.zeros(E, dtype=torch.int64) for h in HEAD_NAMES}
    action["op"] = torch.full((E,), int(op))
    action.update({h: torch.full((E,), v) for h, v in heads.items()})
    return action


def _flat(engine: Engine) -> dict[str, torch.Tensor]:
    state = engine.state.to_dict()
    flat = {f"state.{k}": v for k, v in state.items() if not isinstance(v, dict)}
    flat.update({f"slots.{k}": v for k, v in state["slots"].items()})
    flat.update({f"aux.{k}": v for k, v in engine.aux.items() if k != CLOCK})
    return flat


def _assert_finite(engine: Engine, out) -> None:
    for k, v in {**_flat(engine), **{f"out.{k}": v for k, v in out.items()}}.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


def test_divergence_is_terminated_pruned_and_contained() -> None:
    clean, faulty = _pair()
    for eng in (clean, faulty):
        eng.reset()
    # a seed in slot 0 of every env, then wait: the fault hits envs holding a live seed
    script = [_action(Op.GERMINATE, slot=0, blueprint=int(Blueprint.CONV_LIGHT), alpha_target=2)]
    script += [_action(Op.WAIT)] * (FAULT_STEP - len(script))
    for step, action in enumerate(script, start=1):
        a, b = clean.step(action), faulty.step(action)
        if step < FAULT_STEP:
            for k, v in _flat(clean).items():
                assert torch.equal(v, _flat(faulty)[k]), k
    hit = torch.arange(E) == FAULT_ENV
    live_before = clean.state["slots", "stage"][FAULT_ENV]
    assert bool((live_before == Stage.TRAINING).any() | (live_before == Stage.GERMINATED).any())
    assert b["terminated"].squeeze(-1).tolist() == hit.tolist()
    assert not a["terminated"].any()
    assert torch.equal(b["done"].squeeze(-1), hit | a["done"].squeeze(-1))
    assert b["reward"][FAULT_ENV, 0].item() == pytest.approx(a["reward"][FAULT_ENV, 0].item() + DIVERGENCE_PENALTY)
    stages = faulty.state["slots", "stage"][FAULT_ENV]
    assert ((stages == Stage.PRUNED) | (stages == Stage.DORMANT)).all()  # every live seed pruned
    assert (stages == Stage.PRUNED).sum() == ((live_before != Stage.DORMANT).sum())
    assert faulty.state["val_loss"][FAULT_ENV].item() == pytest.approx(math.log(10))
    assert faulty.state["val_acc"][FAULT_ENV].item() == pytest.approx(10.0)
    _assert_finite(faulty, b)
    for k, v in _flat(clean).items():  # the other envs: bit-identical to the clean run
        assert torch.equal(v[~hit], _flat(faulty)[k][~hit]), k
    for k in ("observation", "reward", "blueprint_index", ("masks", "head"), ("masks", "slot_by_op")):
        assert torch.equal(a[k][~hit], b[k][~hit]), k

    # the next reset of the diverged env is clean: it equals the clean run's reset of that env
    for eng in (clean, faulty):
        eng.reset(hit)
    for k, v in _flat(clean).items():
        assert torch.equal(v, _flat(faulty)[k]), k
    for _ in range(5):  # and the episodes go on identically, NaN-free
        action = _action(Op.WAIT)
        a, b = clean.step(action), faulty.step(action)
        _assert_finite(faulty, b)
        assert torch.equal(a["observation"], b["observation"]) and not b["terminated"].any()


def test_real_non_finite_metrics_are_guarded() -> None:
    """The guard also covers the wrapped backend: a NaN gradient or accuracy diverges that env."""
    inner = SurrogateDynamics(CFG)
    wrapper = FaultInjectingDynamics(inner, E, [])
    engine = Engine(CFG, wrapper)
    engine.reset()
    metrics, _ = inner.advance(engine.lifecycle_state, {k: v for k, v in engine.aux.items() if k != CLOCK})
    metrics = dict(metrics)
    metrics["gradient_norm"] = metrics["gradient_norm"].clone()
    metrics["gradient_norm"][2, 0] = math.inf
    metrics["val_acc"] = metrics["val_acc"].clone()
    metrics["val_acc"][0] = math.nan
    guarded = wrapper.guard(metrics)
    assert guarded["diverged"].tolist() == [True, False, True]
    for k, v in guarded.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    assert torch.equal(guarded["val_loss"][1], metrics["val_loss"][1])


@pytest.mark.parametrize(
    "faults, pattern",
    [([(0, 0)], r"step: expected an int >= 1, got 0"), ([(1, 3)], r"env: expected an int in \[0, 2\], got 3"),
     ([5], r"faults\): expected \(step, env\) pairs, got 5")],
)
def test_bad_fault_schedules_are_clear_errors(faults, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        FaultInjectingDynamics(SurrogateDynamics(CFG), E, faults)


def test_training_continues_through_divergences() -> None:
    cfg = TrainConfig(
        engine=EngineConfig(n_envs=8, max_epochs=6, seed=1, validate_actions=False),
        updates=2, rollout_len=6, ppo_epochs=1, minibatches=2, hidden=16, progress=False,
    )
    faults = [(2, 0), (3, 5), (8, 5), (9, 7)]
    trainer = Trainer(cfg, FaultInjectingDynamics(SurrogateDynamics(cfg.engine), 8, faults))
    for update in range(2):
        batch = trainer.collect()
        terminated = batch["next", "terminated"].squeeze(-1).nonzero().tolist()
        assert terminated == sorted([e, s - 1 - 6 * update] for s, e in faults if update * 6 < s <= update * 6 + 6)
        for key in ("observation", ("next", "observation"), ("next", "reward"), "sample_log_prob"):
            assert torch.isfinite(batch[key]).all(), key
        trainer.advantages(batch)
        metrics = trainer.update(batch)
        for k in ("loss_objective", "loss_critic", "approx_kl", "grad_norm"):
            assert torch.isfinite(metrics[k]).all(), k
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
