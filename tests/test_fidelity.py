"""Fidelity to the original system (tachyon-beep/esper-lite), one test per behaviour it pins.

Each test replays a minimal sequence of decisions and metric inputs through the batched
transition *and* the per-env reference oracle together (their states must agree after every
step), then checks the outcome the original's own code produces. The expected values were
written from reading the original's source; each test names the function it mirrors
(``kasmina/slot.py``, ``simic/training/*``, ``tamiyo/policy/features.py`` in its ``src/esper``).
docs/FIDELITY.md lists every behaviour with the original's function and ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    OBS_BASE,
    OBS_SLOT,
    AlphaCurve,
    AlphaMode,
    Blueprint,
    Op,
    SpecTables,
    Stage,
)
from esper_soa.core.state import ENV_FIELDS, SLOT_FIELDS, as_dict, make_state
from esper_soa.core.step import after_host, before_host, emit, first_epoch
from esper_soa.reference import ReferenceEngine
from tests.helpers import (
    SPEED_FAST,
    SPEED_INSTANT,
    TARGET_FULL,
    make_actions,
    make_metrics,
    to_numpy,
)

# per-slot observation offsets (SPEC §10)
OBS_STEPS_TOTAL, OBS_STEPS_DONE, OBS_TO_TARGET = 17, 18, 19
OBS_GRAD_NORM, OBS_HEALTH, OBS_PREV_HEALTH = 23, 24, 27
OBS_EPOCHS_IN_STAGE, OBS_FRESHNESS, OBS_SEED_AGE = 28, 29, 30


class Twin:
    """One env (one slot by default) stepped through the batched transition and the oracle."""

    def __init__(self, n_slots: int = 1, max_epochs: int = 150, **cfg_kw) -> None:
        self.cfg = EngineConfig(n_envs=1, n_slots=n_slots, max_epochs=max_epochs, **cfg_kw)
        self.tables = SpecTables(self.cfg.topology, n_slots)
        self.ref = ReferenceEngine(self.cfg)
        self.metrics = dict(val_acc=40.0)  # the metric inputs every later step repeats
        m = make_metrics(1, n_slots, **self.metrics)
        self.state = first_epoch(as_dict(make_state(self.cfg)), _tensors(m))
        self.ref.reset_envs([True], m)
        self.out = emit(self.state, self.tables, self.cfg)

    def step(self, op: Op = Op.WAIT, **heads_and_metrics) -> float:
        """One decision; keyword arguments that name a head go to the action, the rest set the
        metric inputs from this step on. Returns the action's success."""
        heads = {k: v for k, v in heads_and_metrics.items() if k in ("slot", "blueprint", "style", "tempo",
                                                                       "alpha_target", "alpha_speed", "alpha_curve")}
        self.metrics.update({k: v for k, v in heads_and_metrics.items() if k not in heads})
        action = make_actions(1, op=op, **heads)
        m = make_metrics(1, self.cfg.n_slots, **self.metrics)
        new, op, success, reward = before_host(self.state, _tensors(action), self.tables, self.cfg)
        self.state, self.out = after_host(new, _tensors(m), reward, self.tables, self.cfg)
        ref_out = self.ref.transition(action, m)
        np.testing.assert_allclose(self.out["reward"][:, 0].numpy(), ref_out["reward"], rtol=1e-5, atol=1e-5)
        self._assert_twins(ref_out["success"][0], float(success[0]))
        return float(success[0])

    def _assert_twins(self, ref_success: float, success: float) -> None:
        assert ref_success == success
        ref_state, state = self.ref.export_state(), to_numpy(self.state)
        for name in ENV_FIELDS:
            np.testing.assert_allclose(state[name], ref_state[name], rtol=1e-5, atol=1e-5, err_msg=name)
        for name in SLOT_FIELDS:
            np.testing.assert_allclose(state["slots"][name], ref_state["slots"][name], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(self.out["observation"].numpy(), self.ref.observation(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(self.out["blueprint_index"].numpy(), self.ref.blueprint_index())

    def slot(self, name: str, s: int = 0) -> float:
        return self.state["slots"][name][0, s].item()

    def stage(self, s: int = 0) -> Stage:
        return Stage(int(self.slot("stage", s)))

    def obs(self, offset: int, s: int = 0) -> float:
        return self.out["observation"][0, OBS_BASE + OBS_SLOT * s + offset].item()

    def to_training(self, **germinate_heads) -> None:
        assert self.step(Op.GERMINATE, **germinate_heads) == 1.0
        assert self.step(Op.ADVANCE) == 1.0 and self.stage() == Stage.TRAINING

    def to_holding(self, **germinate_heads) -> None:
        """GERMINATE, G1, 10 epochs of training, G2, a 5-tick linear ramp, G3."""
        self.to_training(**germinate_heads)
        while self.slot("epochs_in_stage") < 10:
            self.step()
        assert self.step(Op.ADVANCE) == 1.0 and self.stage() == Stage.BLENDING
        while self.slot("alpha_mode") != AlphaMode.HOLD:
            self.step()
        assert self.step(Op.ADVANCE) == 1.0 and self.stage() == Stage.HOLDING


def _tensors(d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in d.items()}


LINEAR_5 = dict(style=0, tempo=1, alpha_target=TARGET_FULL)  # LINEAR_ADD, STANDARD (5 ticks), FULL


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unsafe", [dict(gradient_health=0.5), dict(has_exploding=True)])
def test_strict_g2_replaces_the_health_checks(unsafe: dict) -> None:
    """Original ``QualityGates._check_g2``: strict mode checks improvement >= 0.5 pp, 10 epochs and
    the gradient ratio >= 0.10 *instead of* health/exploding, so an unhealthy seed blends."""
    for mode, blends in (("strict", True), ("permissive", False)):
        twin = Twin(gate_mode=mode)
        twin.to_training()
        for _ in range(10):
            twin.step(gradient_ratio=0.2, **unsafe)
        twin.step(val_acc=41.0)  # improvement since stage start (40) is 1 pp
        assert twin.step(Op.ADVANCE) == float(blends)
        assert twin.stage() == (Stage.BLENDING if blends else Stage.TRAINING)


def test_strict_g2_needs_improvement_and_ratio() -> None:
    """The same gate fails on a 0.4 pp improvement or a 0.09 gradient ratio."""
    for metrics in (dict(val_acc=40.4, gradient_ratio=0.2), dict(val_acc=41.0, gradient_ratio=0.09)):
        twin = Twin(gate_mode="strict")
        twin.to_training(**metrics)
        for _ in range(10):
            twin.step()
        assert twin.step(Op.ADVANCE) == 0.0 and twin.stage() == Stage.TRAINING


def test_strict_g2_reads_the_running_mean_of_the_gradient_ratio() -> None:
    """The original's trainer feeds G2 ``seed_gradient_norm_ratio = 0.9 ema + 0.1 ratio``, started
    by the seed's first measurement: nine epochs at 0.05 and one at 0.5 average 0.095 < 0.10."""
    twin = Twin(gate_mode="strict")
    twin.to_training(gradient_ratio=0.05)
    for _ in range(8):
        twin.step()
    twin.step(gradient_ratio=0.5, val_acc=41.0)
    assert twin.slot("gradient_ratio") == pytest.approx(0.9 * 0.05 + 0.1 * 0.5)
    assert twin.step(Op.ADVANCE) == 0.0 and twin.stage() == Stage.TRAINING


# 2 -------------------------------------------------------------------------------------------
def test_pruned_after_a_scheduled_prune_is_observed_with_one_epoch() -> None:
    """Original ``SeedSlot.step_epoch`` (BLENDING: the tick that reaches alpha 0 calls ``prune``,
    which zeroes the controller), then the trainer's ``record_accuracy`` counts that epoch for the
    PRUNED slot (vectorized_trainer, "Record accuracy for all active seeds")."""
    twin = Twin()
    twin.to_holding(**LINEAR_5)
    twin.step(Op.PRUNE, alpha_speed=SPEED_FAST, alpha_curve=AlphaCurve.LINEAR)
    assert twin.stage() == Stage.BLENDING and twin.slot("pending_prune")
    blend_epochs = twin.slot("epochs_in_stage")
    twin.step()
    twin.step()  # third tick: alpha reaches 0
    assert twin.stage() == Stage.PRUNED
    assert twin.slot("epochs_in_stage") == 1 and twin.obs(OBS_EPOCHS_IN_STAGE) == pytest.approx(1 / 150)
    assert twin.slot("previous_stage") == Stage.BLENDING
    assert twin.slot("previous_epochs_in_stage") == blend_epochs + 1  # as observed at the last decision
    assert [twin.slot(k) for k in ("alpha", "alpha_start", "alpha_target", "alpha_steps_total", "alpha_steps_done")] == [0, 0, 0, 0, 0]
    twin.step()
    assert twin.stage() == Stage.EMBARGOED and twin.slot("epochs_in_stage") == 0


# 3 -------------------------------------------------------------------------------------------
def test_observation_has_freshness_before_seed_age() -> None:
    """Original ``batch_obs_to_features``: slot feature 29 is counterfactual freshness, 30 is
    seed_age (epochs_total / max_epochs)."""
    twin = Twin()
    twin.to_holding(**LINEAR_5)
    age = twin.slot("seed_age")
    assert twin.obs(OBS_FRESHNESS) == 1.0  # measured this epoch (alpha 1)
    assert twin.obs(OBS_SEED_AGE) == pytest.approx(age / 150) and age > 1


# 4 -------------------------------------------------------------------------------------------
def test_no_counterfactual_for_fossilized_seeds() -> None:
    """Original vectorized_trainer ablation schedule skips FOSSILIZED slots: contribution and
    velocity keep their last values; freshness decays 0.995 per epoch."""
    twin = Twin()
    twin.to_holding(**LINEAR_5)
    twin.step(acc_without_slot=38.0, interaction_sum=0.5)  # measured: c = 2
    assert twin.step(Op.FOSSILIZE) == 1.0 and twin.stage() == Stage.FOSSILIZED
    last = {k: twin.slot(k) for k in ("contribution", "contribution_velocity")}
    for _ in range(3):
        twin.step(acc_without_slot=30.0, interaction_sum=3.0)
    assert {k: twin.slot(k) for k in last} == last and last["contribution"] == pytest.approx(2.0)
    # its interaction_sum reads 0: the original zeroes every live seed's before the ablations
    assert twin.slot("interaction_sum") == 0.0
    assert twin.slot("epochs_since_measurement") == 4
    assert twin.obs(OBS_FRESHNESS) == pytest.approx(0.995**4)


# 5 -------------------------------------------------------------------------------------------
def test_gradient_telemetry_for_training_and_blending_only() -> None:
    """Original ``batch_ops`` collects gradient stats for TRAINING/BLENDING seeds only;
    ``sync_telemetry`` keeps the last values otherwise. The observation's previous gradient health
    is the health as of the last decision (action_execution stores it after each decision), over
    HOLDING and the cooldown as well."""
    twin = Twin()
    twin.to_holding(**LINEAR_5, gradient_health=0.9)
    assert twin.obs(OBS_HEALTH) == pytest.approx(0.9)
    twin.step(gradient_health=0.2)
    twin.step(gradient_health=0.3)
    assert twin.slot("gradient_health") == pytest.approx(0.9)  # HOLDING: not measured
    assert twin.obs(OBS_PREV_HEALTH) == pytest.approx(0.9)
    twin.step(Op.PRUNE, alpha_speed=SPEED_INSTANT)
    twin.step()
    assert twin.stage() == Stage.EMBARGOED
    assert twin.obs(OBS_HEALTH) == pytest.approx(0.9) and twin.obs(OBS_PREV_HEALTH) == pytest.approx(0.9)


def test_previous_gradient_health_lags_one_decision() -> None:
    """In TRAINING, the previous health observed at t+1 is the health observed at t; a seed
    without a measurement by the last decision shows -1 (original ``_previous_gradient_health``)."""
    twin = Twin()
    twin.step(Op.GERMINATE, gradient_health=0.4)
    assert twin.obs(OBS_PREV_HEALTH) == -1.0 and twin.obs(OBS_HEALTH) == 0.0  # GERMINATED: unmeasured
    twin.step(Op.ADVANCE, gradient_health=0.5)
    assert twin.obs(OBS_PREV_HEALTH) == -1.0 and twin.obs(OBS_HEALTH) == pytest.approx(0.5)
    twin.step(gradient_health=0.6)
    assert twin.obs(OBS_PREV_HEALTH) == pytest.approx(0.5) and twin.obs(OBS_HEALTH) == pytest.approx(0.6)


# 6 -------------------------------------------------------------------------------------------
def test_alpha_counters_on_holding_and_fossilize() -> None:
    """Original ``_on_blending_complete``: HOLDING keeps steps_total and sets steps_done to it;
    FOSSILIZE (``advance_stage``) leaves the controller alone, including a FULL retarget's
    fresh step count (``AlphaController.retarget``: target == alpha -> HOLD, done 0)."""
    twin = Twin()
    twin.to_holding(**LINEAR_5)
    assert (twin.slot("alpha_steps_total"), twin.slot("alpha_steps_done")) == (5, 5)
    assert twin.obs(OBS_STEPS_TOTAL) == pytest.approx(5 / 150) and twin.obs(OBS_TO_TARGET) == 0.0
    twin.step(acc_without_slot=38.0)
    assert twin.step(Op.FOSSILIZE) == 1.0
    assert (twin.slot("alpha_steps_total"), twin.slot("alpha_steps_done"), twin.slot("alpha")) == (5, 5, 1.0)

    twin = Twin()
    twin.to_holding(**LINEAR_5)
    twin.step(Op.SET_ALPHA_TARGET, alpha_target=TARGET_FULL, alpha_speed=SPEED_FAST, style=0)
    assert twin.stage() == Stage.HOLDING and twin.slot("alpha_mode") == AlphaMode.HOLD
    assert twin.step(Op.FOSSILIZE) == 1.0
    assert (twin.slot("alpha_steps_total"), twin.slot("alpha_steps_done")) == (3, 0)
    assert twin.obs(OBS_TO_TARGET) == pytest.approx(3 / 150)


# 7 -------------------------------------------------------------------------------------------
def test_auto_g2_does_no_alpha_tick_in_its_epoch() -> None:
    """Original ``step_epoch``: TRAINING with auto G2 advances and returns; the first alpha tick
    of the ramp is in the next epoch."""
    twin = Twin(auto_forward_g2=True)
    twin.to_training(**LINEAR_5)
    while twin.stage() == Stage.TRAINING:
        twin.step()
    assert twin.slot("epochs_in_stage") == 1
    assert (twin.slot("alpha"), twin.slot("alpha_steps_done"), twin.slot("alpha_mode")) == (0.0, 0, AlphaMode.UP)
    twin.step()
    assert twin.slot("alpha") == pytest.approx(0.2) and twin.slot("alpha_steps_done") == 1


# 8 -------------------------------------------------------------------------------------------
def test_auto_g3_enters_holding_when_the_ramp_completes() -> None:
    """Original ``step_epoch`` (BLENDING): tick alpha, then G3 in the same call."""
    twin = Twin(auto_forward_g3=True)
    twin.to_training(**LINEAR_5)
    while twin.slot("epochs_in_stage") < 10:
        twin.step()
    assert twin.step(Op.ADVANCE) == 1.0  # BLENDING; this epoch's tick is the ramp's first
    for _ in range(3):
        twin.step()
        assert twin.stage() == Stage.BLENDING
    assert twin.slot("alpha") == pytest.approx(0.8) and twin.slot("epochs_in_stage") == 4
    twin.step()  # fifth tick: alpha 1, and G3 in the same epoch
    assert twin.stage() == Stage.HOLDING and twin.slot("epochs_in_stage") == 1
    assert twin.slot("previous_epochs_in_stage") == 4 and twin.slot("alpha") == 1.0


# 9 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("auto_g1", [False, True])
def test_first_recorded_epoch_sets_the_seed_baselines(auto_g1: bool) -> None:
    """Original ``SeedMetrics.record_accuracy`` with ``epochs_total == 0``: the seed's first
    recorded epoch sets initial and stage-start accuracy (after any auto G1), while the reward's
    p keeps the val_acc at the GERMINATE decision (handlers/germinate: ``acc_at_germination``)."""
    twin = Twin(auto_forward_g1=auto_g1)
    twin.step(Op.GERMINATE, val_acc=42.0)
    assert twin.stage() == (Stage.TRAINING if auto_g1 else Stage.GERMINATED)
    assert twin.slot("accuracy_at_germination") == 42.0 and twin.slot("accuracy_at_stage_start") == 42.0
    assert twin.slot("germination_val_acc") == 40.0
    twin.step(val_acc=43.0)
    assert twin.slot("accuracy_at_germination") == 42.0 and twin.slot("accuracy_at_stage_start") == 42.0


# 10 ------------------------------------------------------------------------------------------
def test_blueprint_index_of_an_empty_slot_is_minus_one() -> None:
    """Original ``batch_obs_to_features``: -1 where a slot has no state, the blueprint's index
    otherwise (cooldown slots keep theirs)."""
    twin = Twin(n_slots=2)
    assert twin.out["blueprint_index"].tolist() == [[-1, -1]]
    twin.step(Op.GERMINATE, slot=1, blueprint=Blueprint.DEPTHWISE)
    assert twin.out["blueprint_index"].tolist() == [[-1, Blueprint.DEPTHWISE]]
    for _ in range(5):
        twin.step()
    twin.step(Op.PRUNE, slot=1, alpha_speed=SPEED_INSTANT)
    assert twin.stage(1) == Stage.EMBARGOED
    assert twin.out["blueprint_index"].tolist() == [[-1, Blueprint.DEPTHWISE]]


# found by scripts/compare_original.py -------------------------------------------------------
def test_epoch_feature_is_the_one_based_host_epoch() -> None:
    """Original trainer loops ``for epoch in range(1, max_epochs + 1)`` and its observation reads
    that epoch: 1/max after the first host epoch; it trains none after its last decision."""
    twin = Twin(max_epochs=3)
    assert twin.out["observation"][0, 0].item() == pytest.approx(1 / 3)
    twin.step()
    assert twin.out["observation"][0, 0].item() == pytest.approx(2 / 3)
    twin.step()
    twin.step()  # the terminal observation
    assert twin.out["observation"][0, 0].item() == 1.0


def test_holding_count_includes_fossilized_seeds() -> None:
    """Original ``batch_obs_to_features`` counts HOLDING and FOSSILIZED seeds together (base 15)."""
    twin = Twin(n_slots=2)
    twin.to_holding(**LINEAR_5)
    assert twin.out["observation"][0, 15].item() == pytest.approx(1 / 2)
    twin.step(acc_without_slot=38.0)
    assert twin.step(Op.FOSSILIZE) == 1.0
    assert twin.out["observation"][0, 15].item() == pytest.approx(1 / 2)
