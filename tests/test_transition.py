"""Batched transition: compiled == eager, spec worked values through the tensor code, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esper_soa.core.alpha import alpha_progress
from esper_soa.core.config import EngineConfig
from esper_soa.core.lifecycle import record_epoch
from esper_soa.core.masks import compute_masks
from esper_soa.core.spec import (
    AlphaCurve,
    Op,
    SpecTables,
    Stage,
    head_sizes,
    stack_action,
)
from esper_soa.core.state import FLAG_FIELDS, as_dict, from_dict, make_state, reset_rows
from esper_soa.core.step import transition
from esper_soa.core.validation import validate_action
from tests.helpers import random_action, random_metrics


@pytest.mark.parametrize(
    "curve, k, expected",
    [
        (AlphaCurve.LINEAR, 0.0, [0.2, 0.4, 0.6, 0.8, 1.0]),
        (AlphaCurve.COSINE, 0.0, [0.095, 0.345, 0.655, 0.905, 1.0]),
        (AlphaCurve.SIGMOID, 12.0, [0.024, 0.230, 0.770, 0.976, 1.0]),
    ],
)
def test_alpha_curve_worked_values(curve: AlphaCurve, k: float, expected: list[float]) -> None:
    t = torch.arange(1, 6, dtype=torch.float32) / 5
    p = alpha_progress(t, torch.full((5,), int(curve)), torch.full((5,), k))
    np.testing.assert_allclose(p.numpy(), expected, atol=1e-3)


def _drive(cfg: EngineConfig, steps: int, seed: int = 0, fn=transition):
    tables = SpecTables(cfg.topology, cfg.n_slots)
    rng = np.random.default_rng(seed)
    state = record_epoch(as_dict(make_state(cfg)), random_metrics(rng, cfg.n_envs, cfg.n_slots))
    outs = []
    for _ in range(steps):
        masks = compute_masks(state, tables, cfg)
        action = random_action(rng, masks, cfg.n_slots)
        state, out = fn(state, action, random_metrics(rng, cfg.n_envs, cfg.n_slots), tables, cfg)
        outs.append(out)
    return state, outs


def test_transition_compiles_fullgraph_and_matches_eager() -> None:
    cfg = EngineConfig(n_envs=6, n_slots=3, auto_forward_g1=True, max_seeds=2)
    compiled = torch.compile(transition, fullgraph=True)
    state_e, outs_e = _drive(cfg, 40)
    state_c, outs_c = _drive(cfg, 40, fn=compiled)
    for a, b in zip(outs_e, outs_c):
        for k in a:  # the return accumulates 40 rewards of ~|40|: float32 fusion order differs
            tol = dict(rtol=1e-5, atol=1e-4) if k == "episode_return" else {}
            torch.testing.assert_close(a[k], b[k], msg=k, **tol)
        # the documented feature-major layout (features.observe), eager and compiled alike
        assert a["observation"].stride() == b["observation"].stride() == (1, cfg.n_envs)
    for k, v in state_e["slots"].items():
        torch.testing.assert_close(v, state_c["slots"][k], msg=k)


def test_germinate_then_instant_prune_timeline() -> None:
    """Observed stages after an instant prune: EMBARGOED x5, RESETTING x1, then DORMANT."""
    cfg = EngineConfig(n_envs=1, n_slots=1)
    tables = SpecTables(cfg.topology, 1)
    rng = np.random.default_rng(0)
    state = record_epoch(as_dict(make_state(cfg)), random_metrics(rng, 1, 1))
    wait = {k: torch.zeros(1, dtype=torch.int64) for k in head_sizes(1)}
    germ = {**wait, "op": torch.tensor([int(Op.GERMINATE)]), "blueprint": torch.tensor([1])}
    prune = {**wait, "op": torch.tensor([int(Op.PRUNE)])}
    seen = []
    for action in [germ] + [wait] * 5 + [prune] + [wait] * 6:
        state, out = transition(state, action, random_metrics(rng, 1, 1), tables, cfg)
        seen.append(int(state["slots"]["stage"][0, 0]))
    assert seen[:6] == [Stage.GERMINATED] * 6
    assert seen[6:] == [Stage.EMBARGOED] * 5 + [Stage.RESETTING] + [Stage.DORMANT]
    assert bool(out["masks"]["slot_by_op"][0, Op.GERMINATE, 0])


def test_reset_rows_leaves_other_rows_bit_identical() -> None:
    cfg = EngineConfig(n_envs=6, n_slots=2)
    state, _ = _drive(cfg, 30)
    fresh = as_dict(make_state(cfg))
    rows = torch.tensor([True, False, True, False, False, True])
    out = reset_rows(state, fresh, rows)
    for k, v in out["slots"].items():
        assert torch.equal(v[~rows], state["slots"][k][~rows]), k
        assert torch.equal(v[rows], fresh["slots"][k][rows]), k
    assert torch.equal(out["epoch"][~rows], state["epoch"][~rows])


def test_flags_int32_inside_bool_outside_and_either_drives_the_transition() -> None:
    """``as_dict`` hands the transitions int32 flags, ``from_dict`` gives bools back, and the
    batched code reads a flag the same way whichever dtype it gets."""
    cfg = EngineConfig(n_envs=6, n_slots=3, auto_forward_g1=True)
    state, _ = _drive(cfg, 25)
    public = from_dict(state, cfg.n_envs, cfg.n_slots, torch.device("cpu"))
    assert FLAG_FIELDS == {"pending_prune", "contribution_measured", "gradient_measured", "has_vanishing", "has_exploding"}
    for k in FLAG_FIELDS:
        assert state["slots"][k].dtype == torch.int32 and public["slots"][k].dtype == torch.bool, k
        assert torch.equal(as_dict(public)["slots"][k], state["slots"][k]), k
    assert any(bool(public["slots"][k].any()) for k in FLAG_FIELDS)  # the check below is not vacuous
    rng = np.random.default_rng(3)
    tables = SpecTables(cfg.topology, cfg.n_slots)
    action = random_action(rng, compute_masks(state, tables, cfg), cfg.n_slots)
    metrics = random_metrics(rng, cfg.n_envs, cfg.n_slots)
    from_ints, out_ints = transition(state, action, metrics, tables, cfg)
    from_bools, out_bools = transition(public.to_dict(), action, metrics, tables, cfg)
    torch.testing.assert_close(out_ints, out_bools, rtol=0, atol=0)
    for k, v in from_ints["slots"].items():
        assert torch.equal(v, from_bools["slots"][k].to(v.dtype)), k


def _wait(n_envs: int, n_slots: int) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(n_envs, dtype=torch.int64) for k in head_sizes(n_slots)}


def test_validate_action_errors_are_specific() -> None:
    cfg = EngineConfig(n_envs=3, n_slots=2)
    masks = compute_masks(as_dict(make_state(cfg)), SpecTables("cnn", 2), cfg)
    ok = _wait(3, 2)
    validate_action(ok, masks, cfg)
    with pytest.raises(ValueError, match=r"shape \(3,\), got \(2,\)"):
        validate_action({**ok, "op": torch.zeros(2, dtype=torch.int64)}, masks, cfg)
    with pytest.raises(ValueError, match="integer dtype"):
        validate_action({**ok, "op": torch.zeros(3)}, masks, cfg)
    with pytest.raises(ValueError, match="expected device cpu, got meta"):
        validate_action({**ok, "op": torch.zeros(3, dtype=torch.int64, device="meta")}, masks, cfg)
    with pytest.raises(ValueError, match=r"indices in \[0, 2\), got 5"):
        validate_action({**ok, "slot": torch.tensor([0, 5, 0])}, masks, cfg)
    with pytest.raises(ValueError, match="missing head 'alpha_curve'"):
        validate_action({k: v for k, v in ok.items() if k != "alpha_curve"}, masks, cfg)
    with pytest.raises(ValueError, match=r"action\['op'\] = 3 at env 1 is masked"):
        validate_action({**ok, "op": torch.tensor([0, int(Op.PRUNE), 0])}, masks, cfg)
    germ = {**ok, "op": torch.full((3,), int(Op.GERMINATE)), "blueprint": torch.tensor([1, 8, 1])}
    with pytest.raises(ValueError, match=r"action\['blueprint'\] = 8 at env 1 is masked"):
        validate_action(germ, masks, cfg)
    # irrelevant heads are not checked: WAIT with a masked blueprint is fine
    validate_action({**ok, "blueprint": torch.tensor([8, 0, 12])}, masks, cfg)
    validate_action({**ok, "op": torch.full((3,), 9)}, masks, cfg, check_values=False)
    # the [E, 8] form (the policy's): checked the same way, handed on as int64 [E, 8] contiguous
    packed = validate_action(stack_action(ok).to(torch.int32), masks, cfg)
    assert packed.dtype == torch.int64 and packed.shape == (3, 8) and packed.is_contiguous()
    assert torch.equal(validate_action(ok, masks, cfg), packed)
    with pytest.raises(ValueError, match=r"expected shape \(3, 8\)"):
        validate_action(torch.zeros(3, 7, dtype=torch.int64), masks, cfg)
    with pytest.raises(ValueError, match=r"action\['op'\] = 3 at env 1 is masked"):
        validate_action(stack_action({**ok, "op": torch.tensor([0, int(Op.PRUNE), 0])}), masks, cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_slots": 0}, "n_slots"),
        ({"topology": "rnn"}, "topology"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"gate_mode": "lenient"}, "gate_mode"),
        ({"reward_mode": "dense"}, "reward_mode"),
        ({"n_envs": 0}, "n_envs"),
        ({"enabled_slots": (False, False, False)}, "enabled_slots"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)
