"""SHAPED against the original's reward code, one test per fidelity fix (SPEC §12, issue 12).

Each test builds the minimal state in the reference oracle, whose rewards the differential test
ties to the batched engine, and pins the value the original's function computes for it (read
from esper-lite ``simic/rewards/contribution.py``; the function is named in each test).
"""

from __future__ import annotations

import math

import pytest

from esper_soa.core.spec import GAMMA, Op, Stage
from tests.test_reference import make_engine, reward_of, set_slot

H, P = 1e5, 4000.0
RENT_BLEND = -0.5 * math.log(1 + (0.0039 * H + 0.5 * P) / H)  # one BLENDING seed at alpha 0.5
PBRS_BLEND_E2 = 0.3 * (GAMMA * (3.5 + 0.6) - (3.5 + 0.3))


def blending_engine(**fields):
    """One BLENDING seed (alpha 0.5, e = 2, germinated late enough for tau = 1), I = 0."""
    eng = make_engine(n_slots=2)
    env = eng.envs[0]
    env.epoch = 40
    env.val_acc = env.acc_committed = env.acc_all_seeds_off = 50.0
    base = dict(stage=Stage.BLENDING, previous_stage=Stage.TRAINING, epochs_in_stage=2, seed_age=10,
                germination_epoch=30, alpha=0.5, alpha_target=0.5, previous_alpha=0.5, seed_params=P,
                contribution=0.0, contribution_measured=True, epochs_since_measurement=0,
                accuracy_at_germination=45.0, accuracy_at_stage_start=50.0)
    set_slot(eng, 0, **{**base, **fields})
    return eng


def test_improvement_keeps_fossils_on() -> None:
    """compute_contribution_reward: ``counterfactual_total_improvement`` = val_acc minus the
    all-disabled ablation, which only disables the measured (non-fossil) seeds. A fossil that
    makes val_acc exceed the host alone must not hide a harmful blending seed: I is taken against
    acc_committed, so the blending warning fires."""
    eng = blending_engine(contribution=0.0)
    eng.envs[0].acc_all_seeds_off = 45.0  # host alone far below (a fossil adds 5 pp)
    eng.envs[0].acc_committed = 50.5  # but the uncommitted seed costs 0.5 pp: I = -0.5
    warning = -0.1 - 0.05 * 2
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(warning + PBRS_BLEND_E2 + RENT_BLEND)


def test_negative_contribution_not_discounted() -> None:
    """compute_contribution_reward: ``seed_contribution < 0 -> bounded = contribution_weight * c``
    with no attribution_discount and no timing discount (those apply to the c >= 0 branch only)."""
    eng = blending_engine(contribution=-2.0, seed_age=38, germination_epoch=2)  # tau would be 0.58
    eng.envs[0].acc_committed = 51.0  # I = -1: d would be sigmoid(-3)
    warning = -0.1 - 0.05 * 2
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(-2.0 + warning + PBRS_BLEND_E2 + RENT_BLEND)


def test_proxy_pays_only_improvement() -> None:
    """compute_contribution_reward, proxy path: ``proxy_contribution_weight *
    improvement_since_stage_start`` only when that improvement is > 0 (no penalty otherwise)."""
    eng = blending_engine(contribution_measured=False, accuracy_at_stage_start=52.0)  # improvement -2
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(PBRS_BLEND_E2 + RENT_BLEND)
    eng = blending_engine(contribution_measured=False, accuracy_at_stage_start=48.0)  # improvement +2
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(0.3 * 2.0 + PBRS_BLEND_E2 + RENT_BLEND)


def test_synergy_needs_positive_interaction_and_attribution_after_ratio_penalty() -> None:
    """compute_contribution_reward + _compute_synergy_bonus: synergy only when interaction_sum > 0,
    attribution_discount >= 0.5 and bounded_attribution (ratio penalty included) > 0."""
    # negative interaction: no synergy (tanh would have paid a negative one)
    eng = blending_engine(contribution=2.0, interaction_sum=-1.0)
    eng.envs[0].acc_committed = 48.0  # I = 2: c/I = 1, no ratio penalty
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(2.0 + PBRS_BLEND_E2 + RENT_BLEND)
    # c = 1.05 with I = 0 (<= 0.1): ratio penalty -0.3 * 0.105 -> bounded 1.0185 > 0: synergy paid
    eng = blending_engine(contribution=1.05, interaction_sum=1.0)
    rp = -0.3 * 0.105
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(1.05 + rp + 0.1 * math.tanh(0.5) + PBRS_BLEND_E2 + RENT_BLEND)


def test_ransomware_fossilize_penalty() -> None:
    """_contribution_fossilize_shaping: counterfactual improvement < 0 -> -0.5 - min(0.2|I|, 1),
    and -0.3 more when seed_contribution > 0.1 and the improvement < -0.2."""
    eng = blending_engine(stage=Stage.HOLDING, previous_stage=Stage.BLENDING, epochs_in_stage=5, alpha=1.0,
                          alpha_target=1.0, previous_alpha=1.0, contribution=0.5)
    eng.envs[0].acc_committed = 51.0  # I = -1
    rent = -0.5 * math.log(1 + (0.0039 * H + P) / H)
    pbrs = 0.3 * (GAMMA * (5.5 + 1.5) - (5.5 + 1.2))
    # attribution zeroed for FOSSILIZE with I < 0; no ratio penalty (c <= 1)
    shaping = -0.5 - 0.2 - 0.3 - 0.01
    assert reward_of(eng, op=Op.FOSSILIZE) == pytest.approx(pbrs + rent + shaping)


def test_capacity_counts_embargoed_and_resetting_seeds() -> None:
    """compute_contribution_reward, D2 occupancy rent: the trainer's ``n_active_seeds`` counts
    every slot with a seed state that is neither FOSSILIZED nor PRUNED (EMBARGOED and RESETTING
    included), beyond the first free slot at 0.01 each."""
    eng = make_engine(n_slots=3)
    set_slot(eng, 0, stage=Stage.EMBARGOED)
    set_slot(eng, 1, stage=Stage.RESETTING)
    assert reward_of(eng, op=Op.WAIT, slot=2) == pytest.approx(-0.01)
    set_slot(eng, 1, stage=Stage.PRUNED)
    assert reward_of(eng, op=Op.WAIT, slot=2) == pytest.approx(0.0)


def test_timing_discount_uses_the_originals_epoch() -> None:
    """_compute_timing_discount(epoch - seed_age_epochs): the original's epoch is 1-based, so a seed
    germinated at our epoch 3 is discounted as germinated at epoch 4 (tau 0.64, not 0.58)."""
    eng = blending_engine(contribution=1.0, seed_age=7, accuracy_at_germination=48.0)
    eng.envs[0].epoch = 10
    eng.envs[0].acc_committed = 49.0  # I = 1: c/I = 1
    # p = 2 > c = 1: A = c * tau(4)
    assert reward_of(eng, op=Op.WAIT) == pytest.approx(1.0 * 0.64 + PBRS_BLEND_E2 + RENT_BLEND)
