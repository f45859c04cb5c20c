"""Per-env state of the plain-Python reference: one :class:`RefSlot` per slot, one :class:`RefEnv` per env.

State lives in plain Python ``float``/``int``/``bool`` attributes named after the batched
engine's ``SLOT_FIELDS``/``ENV_FIELDS``, so differential tests compare field by field. The small
scalar helpers here (``_f32``, ``_clamp``, ...) are shared by the reference's other modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from esper_soa.core.spec import (
    COUNTERFACTUAL_STAGES,
    GRADIENT_STAGES,
    HISTORY_LEN,
    LIVE_STAGES,
    AlphaMode,
    Stage,
    alpha_progress,
)
from esper_soa.core.state import ENV_FIELDS, I32, SLOT_FIELDS, B, F, I

# state.py dtype -> (Python type of the attribute, numpy dtype of the export)
_PY_TYPE = {F: float, I: int, I32: int, B: bool}
_NP_DTYPE = {F: np.float32, I: np.int64, I32: np.int32, B: np.bool_}

_SLOT_NEUTRAL = {name: _PY_TYPE[dt](v) for name, (dt, v) in SLOT_FIELDS.items()}
_ENV_NEUTRAL = {name: _PY_TYPE[dt](v) for name, (dt, v, _shape) in ENV_FIELDS.items()}
_HISTORY_FIELDS = ("loss_history", "acc_history")




def _f32(x: float) -> float:
    """Round to float32: thresholds on float32 state fields compare at float32 precision."""
    return float(np.float32(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _symlog(x: float) -> float:
    """SEMANTICS: symlog(x) = sign(x) * log1p(|x|)."""
    return math.copysign(math.log1p(abs(x)), x) if x != 0.0 else 0.0


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)



# ================================================================================================
# Slot
# ================================================================================================
class RefSlot:
    """One slot of one env: the SLOT_FIELDS as attributes, plus the alpha controller (SPEC §7)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Every field back to its neutral value (an empty DORMANT slot)."""
        for name, value in _SLOT_NEUTRAL.items():
            setattr(self, name, value)

    @property
    def has_seed(self) -> bool:
        """SPEC §3: a slot has a seed unless it is DORMANT or UNKNOWN."""
        return self.stage not in (Stage.DORMANT, Stage.UNKNOWN)

    def transition_to(self, stage: int, val_acc: float) -> None:
        """A stage change: remember where we came from and restart the stage clock."""
        self.previous_stage = self.stage
        self.previous_epochs_in_stage = self.epochs_in_stage
        self.stage = int(stage)
        self.epochs_in_stage = 0
        self.accuracy_at_stage_start = val_acc

    # --- alpha controller (SPEC §7) -------------------------------------------------------------
    def hold_alpha_at(self, value: float) -> None:
        """Controller HOLD at ``value``: alpha, start and target all equal, no ramp in flight."""
        self.alpha = value
        self.alpha_start = value
        self.alpha_target = value
        self.alpha_steps_total = 0
        self.alpha_steps_done = 0
        self.alpha_mode = int(AlphaMode.HOLD)

    def finish_blend(self) -> None:
        """Entering HOLDING: HOLD at 1, the ramp's length kept and counted as done."""
        self.alpha = self.alpha_start = self.alpha_target = 1.0
        self.alpha_steps_done = self.alpha_steps_total
        self.alpha_mode = int(AlphaMode.HOLD)

    def retarget(self, target: float, steps: int, curve: int, steepness: float) -> None:
        """Start a ramp from the current alpha to ``target`` over ``steps`` ticks (only from HOLD)."""
        if self.alpha_mode != AlphaMode.HOLD:
            raise RuntimeError("alpha controller retargeted while a ramp is in flight")
        self.alpha_start = self.alpha
        self.alpha_target = target
        self.alpha_steps_done = 0
        self.alpha_steps_total = steps
        self.alpha_curve = int(curve)
        self.alpha_steepness = steepness
        if target > self.alpha:
            self.alpha_mode = int(AlphaMode.UP)
        elif target < self.alpha:
            self.alpha_mode = int(AlphaMode.DOWN)
        else:
            self.alpha_mode = int(AlphaMode.HOLD)
        if steps == 0:
            self.alpha = target
            self.alpha_mode = int(AlphaMode.HOLD)

    def tick_alpha(self) -> None:
        """One controller tick: advance the ramp along its curve, land exactly on the target."""
        if self.alpha_mode == AlphaMode.HOLD:
            return
        self.alpha_steps_done += 1
        if self.alpha_steps_done >= self.alpha_steps_total:
            self.alpha = self.alpha_target
            self.alpha_mode = int(AlphaMode.HOLD)
            return
        t = self.alpha_steps_done / self.alpha_steps_total
        p = alpha_progress(t, self.alpha_curve, self.alpha_steepness)
        start, target = self.alpha_start, self.alpha_target
        self.alpha = _clamp(start + (target - start) * p, min(start, target), max(start, target))


# ================================================================================================
# Env
# ================================================================================================
class RefEnv:
    """One env: the ENV_FIELDS as attributes (histories as lists of 5 floats) and its slots."""

    def __init__(self, n_slots: int) -> None:
        self.slots: list[RefSlot] = [RefSlot() for _ in range(n_slots)]
        self.clear()

    def clear(self) -> None:
        """Neutral env (epoch 0, empty histories) with every slot emptied."""
        for name, value in _ENV_NEUTRAL.items():
            if name in _HISTORY_FIELDS:
                setattr(self, name, [value] * HISTORY_LEN)
            else:
                setattr(self, name, value)
        for slot in self.slots:
            slot.clear()

    def record_epoch(self, m: Mapping[str, object]) -> None:
        """Write one host epoch's metrics (SEMANTICS "record_epoch"); ``m`` holds plain scalars/lists."""
        self.val_loss = m["val_loss"]
        self.val_acc = m["val_acc"]
        self.acc_all_seeds_off = m["acc_all_seeds_off"]
        self.acc_committed = m["acc_committed"]
        self.host_params = m["host_params"]
        # oldest first, newest last
        self.loss_history = self.loss_history[1:] + [self.val_loss]
        self.acc_history = self.acc_history[1:] + [self.val_acc]
        self.history_len = min(self.history_len + 1, HISTORY_LEN)

        for s, slot in enumerate(self.slots):
            if slot.stage in LIVE_STAGES and slot.seed_age == 1:
                # the seed's first recorded epoch sets its baselines (original: record_accuracy)
                slot.accuracy_at_germination = self.val_acc
                slot.accuracy_at_stage_start = self.val_acc
            if slot.stage in COUNTERFACTUAL_STAGES and slot.alpha > 0.0:
                # counterfactual: only a seed that reaches the host output is measured, and the
                # original stops measuring FOSSILIZED seeds (their last values stay)
                new = self.val_acc - m["acc_without_slot"][s]
                slot.contribution_velocity = new - slot.contribution if slot.contribution_measured else 0.0
                slot.previous_contribution = slot.contribution
                slot.contribution = new
                slot.interaction_sum = m["interaction_sum"][s]
                slot.contribution_measured = True
                slot.epochs_since_measurement = 0
            else:
                if slot.stage in LIVE_STAGES:  # zeroed before the ablations, not refilled
                    slot.interaction_sum = 0.0
                if slot.contribution_measured:
                    slot.epochs_since_measurement += 1

            if slot.stage in GRADIENT_STAGES:
                # gradient telemetry only for TRAINING and BLENDING seeds, as the original
                slot.gradient_norm = m["gradient_norm"][s]
                slot.gradient_health = m["gradient_health"][s]
                ratio = m["gradient_ratio"][s]  # G2 reads its running mean, as the original's trainer
                slot.gradient_ratio = 0.9 * slot.gradient_ratio + 0.1 * ratio if slot.gradient_measured else ratio
                slot.has_vanishing = m["has_vanishing"][s]
                slot.has_exploding = m["has_exploding"][s]
                slot.gradient_measured = True


# ================================================================================================
# Engine
