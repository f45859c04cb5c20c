"""Unit tests of the plain-Python reference oracle (esper_soa.reference).

They pin the SPEC's worked values and the SEMANTICS decisions the differential tests rely on:
alpha curves, the embargo timeline, masks per stage, gate thresholds, observation layout and a
few hand-computed reward terms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    CURVE_STEEPNESS,
    EMBARGO_EPOCHS,
    GAMMA,
    MIN_PRUNE_AGE,
    OBS_BASE,
    OBS_SLOT,
    AlphaCurve,
    AlphaMode,
    Blueprint,
    Op,
    Stage,
    Style,
    blueprint_params,
    stage_onehot_index,
)
from esper_soa.core.state import ENV_FIELDS, SLOT_FIELDS
from esper_soa.reference import ReferenceEngine, RefSlot, timing_discount
from tests.helpers import (
    SPEED_FAST,
    SPEED_MEDIUM,
    TARGET_HALF,
    TEMPO_STANDARD,
    make_actions,
    make_metrics,
)


def make_engine(n_envs: int = 1, n_slots: int = 3, **cfg_kw) -> ReferenceEngine:
    cfg_kw.setdefault("reward_mode", "shaped")  # the reward tests below pin the original's SHAPED values
    cfg = EngineConfig(n_envs=n_envs, n_slots=n_slots, **cfg_kw)
    eng = ReferenceEngine(cfg)
    eng.reset_envs([True] * n_envs, make_metrics(n_envs, n_slots))
    return eng


def step(eng: ReferenceEngine, metrics: dict | None = None, **heads: int) -> dict:
    m = metrics if metrics is not None else make_metrics(eng.n_envs, eng.n_slots)
    return eng.transition(make_actions(eng.n_envs, **heads), m)


def germinate_to_training(eng: ReferenceEngine, slot: int = 0, **heads: int) -> None:
    """GERMINATE then ADVANCE (G1): the seed is TRAINING with epochs_in_stage 1, seed_age 2."""
    step(eng, op=Op.GERMINATE, slot=slot, **heads)
    out = step(eng, op=Op.ADVANCE, slot=slot)
    assert out["success"][0] == 1.0
    assert eng.envs[0].slots[slot].stage == Stage.TRAINING


def set_slot(eng: ReferenceEngine, s: int, env: int = 0, **fields) -> None:
    slot = eng.envs[env].slots[s]
    for k, v in fields.items():
        assert hasattr(slot, k), k
        setattr(slot, k, v)


# --- alpha controller (SPEC §7) -----------------------------------------------------------------
@pytest.mark.parametrize(
    "curve, expected",
    [
        (AlphaCurve.LINEAR, [0.2, 0.4, 0.6, 0.8, 1.0]),
        (AlphaCurve.COSINE, [0.095, 0.345, 0.655, 0.905, 1.0]),
        (AlphaCurve.SIGMOID, [0.024, 0.230, 0.770, 0.976, 1.0]),
    ],
)
def test_alpha_curve_worked_values(curve: AlphaCurve, expected: list[float]) -> None:
    slot = RefSlot()
    slot.retarget(1.0, 5, curve, CURVE_STEEPNESS[curve])
    assert slot.alpha_mode == AlphaMode.UP
    seen = []
    for _ in range(5):
        slot.tick_alpha()
        seen.append(slot.alpha)
    assert seen == pytest.approx(expected, abs=1e-3)
    assert slot.alpha == 1.0 and slot.alpha_mode == AlphaMode.HOLD
    # a ramp down mirrors it
    slot.retarget(0.0, 5, curve, CURVE_STEEPNESS[curve])
    assert slot.alpha_mode == AlphaMode.DOWN
    slot.tick_alpha()
    assert slot.alpha == pytest.approx(1.0 - expected[0], abs=1e-3)


def test_retarget_zero_steps_and_only_from_hold() -> None:
    slot = RefSlot()
    slot.retarget(0.7, 0, AlphaCurve.LINEAR, 0.0)
    assert slot.alpha == 0.7 and slot.alpha_mode == AlphaMode.HOLD
    slot.retarget(1.0, 3, AlphaCurve.LINEAR, 0.0)
    with pytest.raises(RuntimeError):
        slot.retarget(0.0, 3, AlphaCurve.LINEAR, 0.0)


def test_blend_ramp_through_engine() -> None:
    """First ramp uses the style's curve (SIGMOID_ADD -> k=12) over tempo; then a COSINE retarget."""
    eng = make_engine(n_slots=1)
    germinate_to_training(eng, style=Style.SIGMOID_ADD, tempo=TEMPO_STANDARD)
    slot = eng.envs[0].slots[0]
    while slot.epochs_in_stage < 10:
        step(eng)
    assert eng.masks()["slot_by_op"][0, Op.ADVANCE, 0]
    out = step(eng, op=Op.ADVANCE)
    assert out["success"][0] == 1.0 and slot.stage == Stage.BLENDING
    seen = [slot.alpha]
    for _ in range(4):
        step(eng)
        seen.append(slot.alpha)
    assert seen == pytest.approx([0.024, 0.230, 0.770, 0.976, 1.0], abs=1e-3)
    assert slot.alpha_mode == AlphaMode.HOLD
    step(eng, op=Op.ADVANCE)  # G3 passes at full alpha
    assert slot.stage == Stage.HOLDING and slot.alpha == 1.0
    # HOLDING -> partial target goes back to BLENDING, ramps 1 -> 0.5 with COSINE over 5 ticks
    step(eng, op=Op.SET_ALPHA_TARGET, alpha_target=TARGET_HALF, alpha_speed=SPEED_MEDIUM,
         alpha_curve=AlphaCurve.COSINE, style=Style.LINEAR_MULTIPLY)
    assert slot.stage == Stage.BLENDING and slot.algorithm == 2
    seen = [slot.alpha]
    for _ in range(4):
        step(eng)
        seen.append(slot.alpha)
    assert seen == pytest.approx([1 - 0.5 * p for p in (0.095, 0.345, 0.655, 0.905, 1.0)], abs=1e-3)
    assert not eng.gate_g3(eng.envs[0], slot)  # a partial target stays BLENDING


# --- embargo timeline and prune -----------------------------------------------------------------
def observed_stage(eng: ReferenceEngine, s: int = 0) -> Stage:
    obs = eng.observation()[0]
    block = obs[OBS_BASE + OBS_SLOT * s : OBS_BASE + OBS_SLOT * (s + 1)]
    if block[0] == 0.0:
        return Stage.DORMANT
    (idx,) = np.flatnonzero(block[1:11])
    return next(st for st in Stage if stage_onehot_index(st) == idx and st != Stage.UNKNOWN)


def test_embargo_timeline_after_instant_prune() -> None:
    eng = make_engine()
    step(eng, op=Op.GERMINATE)
    while eng.envs[0].slots[0].seed_age < MIN_PRUNE_AGE:
        step(eng)
    out = step(eng, op=Op.PRUNE, alpha_speed=SPEED_FAST)  # alpha is 0: prunes at once anyway
    assert out["success"][0] == 1.0 and out["executed_op"][0] == Op.PRUNE
    stages = [observed_stage(eng)]
    for _ in range(EMBARGO_EPOCHS + 1):
        m = eng.masks()
        assert not m["op"][0, Op.GERMINATE] and not m["slot_by_op"][0, Op.GERMINATE].any()
        step(eng)
        stages.append(observed_stage(eng))
    assert stages == [Stage.EMBARGOED] * 5 + [Stage.RESETTING] + [Stage.DORMANT]
    slot = eng.envs[0].slots[0]
    assert all(getattr(slot, k) == v for k, (_dt, v) in SLOT_FIELDS.items())
    assert eng.masks()["slot_by_op"][0, Op.GERMINATE, 0]
    assert step(eng, op=Op.GERMINATE)["success"][0] == 1.0


def test_ramped_prune_completes_when_alpha_reaches_zero() -> None:
    eng = make_engine(n_slots=1)
    germinate_to_training(eng)
    slot = eng.envs[0].slots[0]
    while slot.epochs_in_stage < 10:
        step(eng)
    step(eng, op=Op.ADVANCE)
    for _ in range(4):
        step(eng)
    step(eng, op=Op.ADVANCE)
    assert slot.stage == Stage.HOLDING
    step(eng, op=Op.PRUNE, alpha_speed=SPEED_FAST, alpha_curve=AlphaCurve.LINEAR)
    assert slot.stage == Stage.BLENDING and slot.pending_prune
    assert slot.alpha == pytest.approx(2 / 3)
    step(eng)
    assert slot.alpha == pytest.approx(1 / 3) and slot.stage == Stage.BLENDING
    step(eng)
    assert slot.stage == Stage.PRUNED and slot.alpha == 0.0 and not slot.pending_prune
    assert slot.epochs_in_stage == 1  # the original counts the PRUNED epoch (record_accuracy)
    assert (slot.alpha_start, slot.alpha_target, slot.alpha_steps_total, slot.alpha_steps_done) == (0.0, 0.0, 0, 0)
    step(eng)
    assert slot.stage == Stage.EMBARGOED and slot.epochs_in_stage == 0


def test_min_prune_age_masking() -> None:
    eng = make_engine()
    step(eng, op=Op.GERMINATE)
    slot = eng.envs[0].slots[0]
    while slot.seed_age < MIN_PRUNE_AGE:
        assert not eng.masks()["slot_by_op"][0, Op.PRUNE, 0]
        assert not eng.masks()["op"][0, Op.PRUNE]
        step(eng)
    assert eng.masks()["slot_by_op"][0, Op.PRUNE, 0]
    # a masked PRUNE executes as WAIT with success 0
    eng2 = make_engine()
    step(eng2, op=Op.GERMINATE)
    out = step(eng2, op=Op.PRUNE)
    assert out["executed_op"][0] == Op.WAIT and out["success"][0] == 0.0
    assert eng2.envs[0].slots[0].stage == Stage.GERMINATED and eng2.envs[0].last_op == Op.WAIT


# --- gates (SPEC §8) ----------------------------------------------------------------------------
F32 = lambda x: float(np.float32(x))  # noqa: E731  values as they arrive from float32 metrics


@pytest.mark.parametrize("mode", ["permissive", "strict"])
def test_g2_thresholds(mode: str) -> None:
    eng = make_engine(n_slots=1, gate_mode=mode)
    env, slot = eng.envs[0], eng.envs[0].slots[0]
    env.val_acc = 60.5
    good = dict(stage=Stage.TRAINING, epochs_in_stage=10, gradient_measured=True, has_exploding=False,
                gradient_health=F32(0.7), gradient_ratio=F32(0.10), accuracy_at_stage_start=60.0)
    set_slot(eng, 0, **good)
    assert eng.gate_g2(env, slot)
    set_slot(eng, 0, **{**good, "epochs_in_stage": 9})
    assert not eng.gate_g2(env, slot)
    # permissive-only safety checks: strict replaces them (original QualityGates._check_g2)
    for bad in (dict(gradient_measured=False), dict(has_exploding=True), dict(gradient_health=F32(0.69))):
        set_slot(eng, 0, **{**good, **bad})
        assert eng.gate_g2(env, slot) == (mode == "strict"), bad
    # strict-only requirements
    for strict_bad in (dict(accuracy_at_stage_start=60.25), dict(gradient_ratio=F32(0.09))):
        set_slot(eng, 0, **{**good, **strict_bad})
        assert eng.gate_g2(env, slot) == (mode == "permissive"), strict_bad


@pytest.mark.parametrize("mode", ["permissive", "strict"])
def test_g3_thresholds(mode: str) -> None:
    eng = make_engine(n_slots=1, gate_mode=mode)
    env, slot = eng.envs[0], eng.envs[0].slots[0]
    good = dict(stage=Stage.BLENDING, alpha=1.0, alpha_start=0.0, alpha_target=1.0,
                alpha_mode=int(AlphaMode.HOLD), epochs_in_stage=10)
    set_slot(eng, 0, **good)
    assert eng.gate_g3(env, slot)
    for bad in (dict(alpha_target=0.7, alpha=0.7), dict(alpha=0.9, alpha_mode=int(AlphaMode.UP)),
                dict(alpha=0.99)):
        set_slot(eng, 0, **{**good, **bad})
        assert not eng.gate_g3(env, slot), bad
    set_slot(eng, 0, **{**good, "epochs_in_stage": 9})
    assert eng.gate_g3(env, slot) == (mode == "permissive")


@pytest.mark.parametrize("mode", ["permissive", "strict"])
def test_g5_thresholds_and_failed_fossilize(mode: str) -> None:
    eng = make_engine(n_slots=1, gate_mode=mode)
    env, slot = eng.envs[0], eng.envs[0].slots[0]
    set_slot(eng, 0, stage=Stage.HOLDING, alpha=1.0, alpha_target=1.0, contribution_measured=False,
             seed_age=20, epochs_in_stage=3)
    assert not eng.gate_g5(env, slot)
    out = step(eng, op=Op.FOSSILIZE)  # valid op, gate fails: nothing changes, success 0
    assert out["executed_op"][0] == Op.FOSSILIZE and out["success"][0] == 0.0
    assert slot.stage == Stage.HOLDING and env.last_op == Op.FOSSILIZE
    set_slot(eng, 0, contribution_measured=True, contribution=0.99)
    assert eng.gate_g5(env, slot) == (mode == "permissive")
    set_slot(eng, 0, contribution=1.0)
    assert eng.gate_g5(env, slot)
    out = step(eng, op=Op.FOSSILIZE)
    assert out["success"][0] == 1.0 and slot.stage == Stage.FOSSILIZED and env.n_fossilized == 1


# --- masks (SPEC §5, §9) ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage", [Stage.GERMINATED, Stage.TRAINING, Stage.PRUNED, Stage.EMBARGOED, Stage.RESETTING]
)
def test_germinate_blocked_env_wide(stage: Stage) -> None:
    eng = make_engine()
    set_slot(eng, 1, stage=stage, seed_age=3)
    m = eng.masks()
    assert not m["op"][0, Op.GERMINATE]
    assert not m["slot_by_op"][0, Op.GERMINATE].any()
    assert m["slot_by_op"][0, Op.WAIT].all()


@pytest.mark.parametrize("stage", [Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED])
def test_germinate_allowed_beside_later_stages(stage: Stage) -> None:
    eng = make_engine()
    set_slot(eng, 1, stage=stage)
    assert eng.masks()["slot_by_op"][0, Op.GERMINATE].tolist() == [True, False, True]


def test_fossilized_never_regerminable() -> None:
    eng = make_engine(n_slots=1)
    set_slot(eng, 0, stage=Stage.HOLDING, alpha=1.0, alpha_target=1.0, contribution_measured=True,
             contribution=2.0, seed_age=20)
    assert step(eng, op=Op.FOSSILIZE)["success"][0] == 1.0
    for _ in range(30):
        m = eng.masks()
        assert not m["op"][0, Op.GERMINATE]
        assert m["op"][0].tolist() == [True, False, False, False, False, False]
        step(eng)
    assert eng.envs[0].slots[0].stage == Stage.FOSSILIZED


def test_style_and_alpha_target_masks() -> None:
    eng = make_engine(n_slots=1)
    m = eng.masks()  # GERMINATE possible: every style / target allowed
    assert m["style"][0].all() and m["alpha_target"][0].all()
    assert m["blueprint"][0].tolist() == [b in (1, 2, 3, 4, 5, 6, 7) for b in range(13)]
    set_slot(eng, 0, stage=Stage.TRAINING)  # neither GERMINATE nor SET_ALPHA_TARGET possible
    m = eng.masks()
    assert m["style"][0].tolist() == [False, False, True, False]
    assert m["alpha_target"][0].tolist() == [False, False, True]
    assert m["tempo"][0].all() and m["alpha_speed"][0].all() and m["alpha_curve"][0].all()
    set_slot(eng, 0, stage=Stage.HOLDING, alpha=1.0, alpha_target=1.0)  # SET_ALPHA_TARGET possible
    m = eng.masks()
    assert m["op"][0, Op.SET_ALPHA_TARGET] and m["style"][0].all() and m["alpha_target"][0].all()
    set_slot(eng, 0, stage=Stage.BLENDING, alpha=0.4, alpha_mode=int(AlphaMode.UP))  # ramp in flight
    m = eng.masks()
    assert not m["op"][0, Op.SET_ALPHA_TARGET] and not m["style"][0, 0]


def test_transformer_blueprints_and_invalid_blueprint_is_wait() -> None:
    eng = make_engine(n_slots=1, topology="transformer")
    assert np.flatnonzero(eng.masks()["blueprint"][0]).tolist() == [2, 3, 8, 9, 10, 11, 12]
    out = step(eng, op=Op.GERMINATE, blueprint=Blueprint.CONV_LIGHT)
    assert out["executed_op"][0] == Op.WAIT and out["success"][0] == 0.0
    out = step(eng, op=Op.GERMINATE, blueprint=Blueprint.LORA)
    slot = eng.envs[0].slots[0]
    assert out["success"][0] == 1.0 and slot.seed_params == blueprint_params(Blueprint.LORA, 128)


def test_advance_off_with_all_auto_flags() -> None:
    eng = make_engine(auto_forward_g1=True, auto_forward_g2=True, auto_forward_g3=True)
    set_slot(eng, 0, stage=Stage.GERMINATED)
    m = eng.masks()
    assert not m["op"][0, Op.ADVANCE] and not m["slot_by_op"][0, Op.ADVANCE].any()
    step(eng)  # auto G1 in the tick
    assert eng.envs[0].slots[0].stage == Stage.TRAINING and eng.envs[0].slots[0].epochs_in_stage == 1
    eng = make_engine(auto_forward_g1=True, auto_forward_g2=True)
    set_slot(eng, 0, stage=Stage.GERMINATED)
    assert eng.masks()["op"][0, Op.ADVANCE]


def test_seed_limit_and_disabled_slots() -> None:
    eng = make_engine(max_seeds=1, enabled_slots=(True, False, True))
    m = eng.masks()
    assert m["slot_by_op"][0, Op.WAIT].tolist() == [True, False, True]
    assert m["slot_by_op"][0, Op.GERMINATE].tolist() == [True, False, True]
    set_slot(eng, 0, stage=Stage.FOSSILIZED)
    assert not eng.masks()["op"][0, Op.GERMINATE]
    out = step(eng, op=Op.WAIT, slot=1)  # the WAIT row of a disabled slot is False
    assert out["executed_op"][0] == Op.WAIT and out["success"][0] == 0.0


def test_out_of_range_heads_execute_wait() -> None:
    eng = make_engine(n_envs=2)
    acts = make_actions(2, op=Op.GERMINATE)
    acts["tempo"] = np.array([7, 0])
    out = eng.transition(acts, make_metrics(2, 3))
    assert out["executed_op"].tolist() == [Op.WAIT, Op.GERMINATE]
    assert out["success"].tolist() == [0.0, 1.0]
    assert eng.envs[0].slots[0].stage == Stage.DORMANT
    assert eng.envs[1].slots[0].stage == Stage.GERMINATED


# --- observation (SPEC §10) ---------------------------------------------------------------------
@pytest.mark.parametrize("n_slots", [1, 3, 5])
def test_observation_shape(n_slots: int) -> None:
    eng = make_engine(n_envs=2, n_slots=n_slots)
    obs = eng.observation()
    assert obs.shape == (2, 23 + 31 * n_slots) and obs.dtype == np.float32
    assert eng.blueprint_index().shape == (2, n_slots)


def test_observation_history_padding_and_slot_block() -> None:
    eng = make_engine(n_slots=2)
    sl = lambda x: math.log1p(x) / 7  # noqa: E731
    obs = eng.observation()[0]
    assert obs[3:8].tolist() == pytest.approx([-1, -1, -1, -1, sl(1.0)])
    assert obs[8:13].tolist() == pytest.approx([-1, -1, -1, -1, 0.5])
    assert obs[0] == pytest.approx(1 / 150) and obs[16] == 1.0  # the first host epoch, 1-based and obs[17:23].tolist() == [1, 0, 0, 0, 0, 0]
    assert not obs[OBS_BASE:].any()  # empty slots are zeros
    step(eng, make_metrics(1, 2, val_acc=60.0, val_loss=0.5), op=Op.GERMINATE, slot=1,
         blueprint=Blueprint.NORM, tempo=2)
    obs = eng.observation()[0]
    assert obs[0] == pytest.approx(2 / 150)
    assert obs[3:8].tolist() == pytest.approx([-1, -1, -1, sl(1.0), sl(0.5)])
    assert obs[8:13].tolist() == pytest.approx([-1, -1, -1, 0.5, 0.6])
    assert obs[17:23].tolist() == [0, 1, 0, 0, 0, 0]
    s1 = obs[OBS_BASE + OBS_SLOT : OBS_BASE + 2 * OBS_SLOT]
    assert s1[0] == 1.0 and s1[1 + stage_onehot_index(Stage.GERMINATED)] == 1.0 and s1[1:11].sum() == 1.0
    assert s1[14] == pytest.approx(8 / 12)  # tempo SLOW
    assert s1[27] == -1.0  # previous gradient health never measured
    assert s1[28] == pytest.approx(1 / 150) and s1[30] == pytest.approx(1 / 150)  # stage epochs, seed age
    assert s1[29] == -1.0  # counterfactual never measured (freshness comes before seed_age)
    assert eng.blueprint_index()[0].tolist() == [-1, Blueprint.NORM]  # -1: empty, as the original
    for _ in range(5):
        step(eng)
    assert (eng.observation()[0][3:13] != -1).all()


# --- reward (SPEC §12) --------------------------------------------------------------------------
def reward_of(eng: ReferenceEngine, **heads: int) -> float:
    return float(eng.reward(make_actions(eng.n_envs, **heads))[0])


def test_germinate_shaping_epoch_0_and_12() -> None:
    """Mirrors the original's GERMINATE branch of ``compute_contribution_reward``: tau is taken at
    its 1-based epoch (our epoch 0 is its epoch 1: tau = 0.46), and at its last epoch
    (``epoch == max_epochs``) only the -0.15 cost is paid."""
    eng = make_engine(n_slots=1, max_epochs=14)
    assert reward_of(eng, op=Op.GERMINATE) == pytest.approx(0.3 * GAMMA * 0.46 - 0.15)
    for _ in range(12):
        step(eng)
    assert eng.envs[0].epoch == 12
    assert reward_of(eng, op=Op.GERMINATE) == pytest.approx(0.3 * GAMMA * 1.0 - 0.15)
    assert reward_of(eng, op=Op.WAIT) == 0.0
    step(eng)
    assert reward_of(eng, op=Op.GERMINATE) == pytest.approx(0.05 * 50.0 - 0.15)  # terminal + cost only
    assert [timing_discount(g) for g in (0, 5, 9, 10)] == pytest.approx([0.4, 0.7, 0.94, 1.0])


def test_rent_and_capacity_terms() -> None:
    eng = make_engine(n_slots=2)
    H, P = 1e5, 20000.0
    set_slot(eng, 0, stage=Stage.FOSSILIZED, alpha=1.0, previous_alpha=1.0, seed_params=P)
    g = (0.0039 * H + 1.0 * P) / H
    assert reward_of(eng, op=Op.WAIT, slot=1) == pytest.approx(-0.5 * math.log(1 + g) - 0.002)
    set_slot(eng, 0, seed_params=1e9)  # rent is capped at 1.5
    assert reward_of(eng, op=Op.WAIT, slot=1) == pytest.approx(-1.5 - 0.002)
    # alpha shock: alpha moved 0 -> 0.5 in the last step (capped at 1), no rent for TRAINING
    set_slot(eng, 0, stage=Stage.TRAINING, alpha=0.5, previous_alpha=0.0, seed_params=P)
    assert reward_of(eng, op=Op.WAIT, slot=1) == pytest.approx(-0.1958 * 0.25 * P / H)


def test_terminal_term() -> None:
    eng = make_engine(n_slots=2, max_epochs=12)
    total = step(eng, op=Op.GERMINATE)["reward"][0] + step(eng, op=Op.ADVANCE)["reward"][0]
    while eng.envs[0].epoch < 11:
        assert reward_of(eng, op=Op.WAIT, slot=1) == 0.0
        step(eng, op=Op.WAIT, slot=1)
    age = eng.envs[0].slots[0].seed_age
    assert age == 11
    expected = 0.05 * 50.0 - 0.3 * GAMMA / GAMMA**age
    assert reward_of(eng, op=Op.WAIT, slot=1) == pytest.approx(expected)
    assert step(eng, op=Op.WAIT, slot=1)["reward"][0] == pytest.approx(expected)
    assert eng.envs[0].episode_return == pytest.approx(total + expected)


def test_prune_shaping_unknown_contribution() -> None:
    eng = make_engine(n_slots=1)
    germinate_to_training(eng)
    while eng.envs[0].slots[0].epochs_in_stage < 5:
        step(eng)
    slot = eng.envs[0].slots[0]
    assert slot.seed_age == 6 and not slot.contribution_measured
    phi5, phi4 = 2.0 + 1.5, 2.0 + 1.2  # TRAINING base 2 + 0.3 e
    pbrs = 0.3 * (GAMMA * phi5 - phi4)
    assert reward_of(eng, op=Op.PRUNE) == pytest.approx(pbrs - 0.3 * phi5 - 0.005)
    # ADVANCE from TRAINING pays its fee (gate outcome does not matter for the reward)
    assert reward_of(eng, op=Op.ADVANCE) == pytest.approx(pbrs - 0.1)


def test_prune_shaping_harmful_seed() -> None:
    eng = make_engine(n_slots=1)
    H, P = 1e5, 4000.0
    set_slot(eng, 0, stage=Stage.BLENDING, previous_stage=Stage.TRAINING, epochs_in_stage=2, seed_age=8,
             germination_epoch=20, alpha=0.5, alpha_target=0.5, previous_alpha=0.5, seed_params=P,
             contribution=-1.0, contribution_measured=True, epochs_since_measurement=0,
             accuracy_at_germination=45.0)
    # A = c * d * tau = -1, negated for PRUNE -> +1; no synergy (interaction 0)
    pbrs = 0.3 * (GAMMA * (3.5 + 0.6) - (3.5 + 0.3))
    rent = -0.5 * math.log(1 + (0.0039 * H + 0.5 * P) / H)
    shaping = -0.3 * (3.5 + 0.6) + 0.15 - 0.005
    assert reward_of(eng, op=Op.PRUNE) == pytest.approx(1.0 + pbrs + rent + shaping)
    # the same seed under WAIT keeps the negative attribution
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(-1.0 + pbrs + rent)


def test_fossilize_shaping() -> None:
    eng = make_engine(n_slots=1)
    eng.envs[0].acc_committed = 49.5  # I = 0.5
    eng.envs[0].epoch = 50  # germinated at the original's epoch 50 + 1 - 30 = 21: tau = 1
    H, P = 1e5, 4000.0
    set_slot(eng, 0, stage=Stage.HOLDING, previous_stage=Stage.BLENDING, epochs_in_stage=5, seed_age=30,
             germination_epoch=20, alpha=1.0, alpha_target=1.0, previous_alpha=1.0, seed_params=P,
             contribution=2.0, contribution_measured=True, epochs_since_measurement=0,
             accuracy_at_germination=47.0, interaction_sum=1.0)
    A = 2.0  # c = 2 < p = 3 -> c; d = tau = 1; c/I = 4 <= 5: no ratio penalty
    synergy = 0.1 * math.tanh(0.5)
    pbrs = 0.3 * (GAMMA * (5.5 + 1.5) - (5.5 + 1.2))
    rent = -0.5 * math.log(1 + (0.0039 * H + P) / H)
    shaping = (0.5 + 0.2) * 1.0 + 0.9645 * 1.0 - 0.01
    assert reward_of(eng, op=Op.FOSSILIZE) == pytest.approx(A + synergy + pbrs + rent + shaping)
    # WAIT on a useful HOLDING seed pays the indecision term (c)
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(A + synergy + pbrs + rent - min(0.1 + 0.05 * 3, 0.3))


@pytest.mark.parametrize("mode", ["sparse", "minimal", "simplified"])
def test_other_reward_modes(mode: str) -> None:
    eng = make_engine(n_slots=2, max_epochs=3, reward_mode=mode)
    # a fossil measured at 1.5 pp before it fossilized; fossils are not measured again (original)
    set_slot(eng, 0, stage=Stage.FOSSILIZED, seed_params=50000.0, alpha=1.0, alpha_target=1.0,
             contribution=1.5, contribution_measured=True)
    assert reward_of(eng, slot=1) == 0.0
    m = make_metrics(1, 2, acc_without_slot=40.0)
    step(eng, m, slot=1)
    step(eng, m, slot=1)
    assert eng.envs[0].slots[0].contribution == pytest.approx(1.5)
    assert eng.envs[0].slots[0].epochs_since_measurement == 2
    expected = {
        "sparse": 0.5 - 0.1 * 50000.0 / 5e5,
        "minimal": 0.5 - 0.1 * 50000.0 / 5e5,
        "simplified": 3 * 0.5 + 2.0 + 0.3 * (GAMMA * (6.0 + 0.6) - (6.0 + 0.3)),
    }[mode]
    assert reward_of(eng, slot=0) == pytest.approx(expected)


# --- state export -------------------------------------------------------------------------------
def test_export_state_dtypes_and_roundtrip() -> None:
    eng = make_engine(n_envs=2, n_slots=3)
    step(eng, op=Op.GERMINATE, slot=2)
    st = eng.export_state()
    for name, (dt, _v, shape) in ENV_FIELDS.items():
        assert st[name].shape == (2, *shape), name
        assert str(st[name].dtype) == str(dt).replace("torch.", ""), name
    for name, (dt, _v) in SLOT_FIELDS.items():
        assert st["slots"][name].shape == (2, 3), name
        assert str(st["slots"][name].dtype) == str(dt).replace("torch.", ""), name
    assert st["slots"]["stage"][:, 2].tolist() == [Stage.GERMINATED] * 2
    other = ReferenceEngine(eng.cfg)
    other.load_state(st)
    np.testing.assert_array_equal(other.observation(), eng.observation())
    m = make_metrics(2, 3)
    a = make_actions(2, op=Op.ADVANCE, slot=2)
    assert other.transition(a, m)["success"].tolist() == eng.transition(a, m)["success"].tolist()
