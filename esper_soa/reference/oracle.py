"""Plain-Python reference oracle of the seed lifecycle (SPEC.md + docs/SEMANTICS.md).

One :class:`RefEnv` per env and one :class:`RefSlot` per slot, looped over the way the original
object-per-env system loops. State lives in plain Python ``float``/``int``/``bool`` attributes;
numpy appears only at the API boundary (actions and metrics in, masks/observations/state out).

This module is the oracle for differential tests against the batched tensor engine and the
"before" in benchmarks, so it favours a line-by-line match with the SPEC over speed. Every
numbered rule it implements names the SPEC section or SEMANTICS paragraph it comes from.

Precision: state is kept in double precision, while the engine stores float32. Gate thresholds
that are not exactly representable in float32 (0.7, 0.10) are compared at float32 precision
(``_f32``), which is what a float32 tensor compared with a Python scalar does in torch; that keeps
the oracle and the engine on the same side of a threshold when a test feeds e.g. health = 0.7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    ADVANCEABLE_STAGES,
    ALPHA_ATOL,
    ALPHA_SPEED_TICKS,
    ALPHA_TARGET_DEFAULT,
    ALPHA_TARGETS,
    CF_FRESHNESS_DECAY,
    COUNTERFACTUAL_STAGES,
    CURVE_STEEPNESS,
    EMBARGO_EPOCHS,
    EMPTY_BLUEPRINT_INDEX,
    G2_MIN_EPOCHS,
    G2_MIN_HEALTH,
    G2_STRICT_GRAD_RATIO,
    G2_STRICT_IMPROVEMENT,
    G3_STRICT_MIN_EPOCHS,
    G5_STRICT_CONTRIBUTION,
    GAMMA,
    GERMINATE_BLOCKING_STAGES,
    GRADIENT_STAGES,
    HEAD_NAMES,
    HISTORY_LEN,
    LIVE_STAGES,
    MIN_PRUNE_AGE,
    N_STAGE_ONEHOT,
    OBS_BASE,
    OBS_SLOT,
    OBS_STAGE_COUNTS,
    PRUNABLE_STAGES,
    RESETTING_EPOCHS,
    STYLE_ALGORITHM,
    STYLE_CURVE,
    STYLE_DEFAULT,
    TEMPO_EPOCHS,
    TOPOLOGY_BLUEPRINTS,
    AlphaMode,
    Blueprint,
    Op,
    Stage,
    alpha_progress,
    blueprint_params,
    head_sizes,
    slot_widths,
    stage_onehot_index,
)
from esper_soa.core.state import ENV_FIELDS, I32, SLOT_FIELDS, B, F, I

__all__ = ["RefSlot", "RefEnv", "ReferenceEngine"]

# state.py dtype -> (Python type of the attribute, numpy dtype of the export)
_PY_TYPE = {F: float, I: int, I32: int, B: bool}
_NP_DTYPE = {F: np.float32, I: np.int64, I32: np.int32, B: np.bool_}

_SLOT_NEUTRAL = {name: _PY_TYPE[dt](v) for name, (dt, v) in SLOT_FIELDS.items()}
_ENV_NEUTRAL = {name: _PY_TYPE[dt](v) for name, (dt, v, _shape) in ENV_FIELDS.items()}
_HISTORY_FIELDS = ("loss_history", "acc_history")

_N_OPS = len(Op)
_METRIC_ENV = ("val_loss", "val_acc", "acc_all_seeds_off", "acc_committed", "host_params")
_METRIC_SLOT_FLOATS = ("acc_without_slot", "interaction_sum", "gradient_norm", "gradient_health", "gradient_ratio")
_METRIC_SLOT_BOOLS = ("has_vanishing", "has_exploding")

# --- reward constants (SPEC §12; none of these live in spec.py) --------------------------------
PHI_BASE = {
    Stage.UNKNOWN: 0.0,
    Stage.DORMANT: 0.0,
    Stage.GERMINATED: 1.0,
    Stage.TRAINING: 2.0,
    Stage.BLENDING: 3.5,
    Stage.HOLDING: 5.5,
    Stage.FOSSILIZED: 6.0,
    Stage.PRUNED: 0.0,
    Stage.EMBARGOED: 0.0,
    Stage.RESETTING: 0.0,
}
PHI_EPOCH_RATE = 0.3  # Phi grows 0.3 per epoch in stage ...
PHI_EPOCH_CAP = 2.0  # ... up to +2
PBRS_WEIGHT = 0.3
TIMING_FULL_EPOCH = 10  # tau(g) = 1 from epoch 10 on
RENT_HOST_FRACTION = 0.0039
PARAMS_FLOOR = 200.0  # max(H, 200)
SHOCK_COEF = 0.1958
FOSSIL_BONUS = 0.9645
SPARSE_PARAM_SCALE = 5e5
COMMIT_WEIGHT = 20.0  # W of COMMITTED (SPEC §12b)
DIVERGENCE_PENALTY = -10.0  # SPEC §13: reward on the step a host diverges
FOSSIL_PARAM_PRICE = 50_000.0  # J: 1 pp per 50,000 fossil parameters
OCCUPYING_STAGES = PRUNABLE_STAGES + (Stage.EMBARGOED, Stage.RESETTING)  # capacity term (h)


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


def phi(stage: int, epochs_in_stage: int) -> float:
    """Stage potential Phi(stage, e) of SPEC §12 (stages without a listed base have base 0)."""
    return PHI_BASE.get(Stage(stage), 0.0) + min(PHI_EPOCH_RATE * epochs_in_stage, PHI_EPOCH_CAP)


def timing_discount(g: int) -> float:
    """tau(g): credit for seeds germinated in the first 10 epochs is discounted (SPEC §12)."""
    return 1.0 if g >= TIMING_FULL_EPOCH else 0.4 + 0.06 * g


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
# ================================================================================================
class ReferenceEngine:
    """E independent envs stepped one by one in Python; same contract as the batched engine."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.n_envs = cfg.n_envs
        self.n_slots = cfg.n_slots
        self.enabled: tuple[bool, ...] = cfg.slots_enabled
        self.widths: tuple[int, ...] = slot_widths(cfg.topology, cfg.n_slots)
        self.topology_blueprints: frozenset[int] = frozenset(TOPOLOGY_BLUEPRINTS[cfg.topology])
        self.head_sizes: dict[str, int] = head_sizes(cfg.n_slots)
        self.envs: list[RefEnv] = [RefEnv(cfg.n_slots) for _ in range(cfg.n_envs)]

    # --- boundary helpers -----------------------------------------------------------------------
    def _metric_rows(self, metrics: Mapping[str, np.ndarray]) -> list[dict[str, object]]:
        """Per-env metrics as plain Python scalars (per-slot fields as lists), one dict per env."""
        # float64 holds every float32 exactly, so the oracle sees the values the engine sees
        cols = {name: np.asarray(metrics[name], dtype=np.float64).tolist() for name in _METRIC_ENV + _METRIC_SLOT_FLOATS}
        cols.update({name: np.asarray(metrics[name], dtype=bool).tolist() for name in _METRIC_SLOT_BOOLS})
        cols["diverged"] = np.asarray(metrics["diverged"], dtype=bool).tolist()
        return [{name: col[i] for name, col in cols.items()} for i in range(self.n_envs)]

    def _action_rows(self, actions: Mapping[str, np.ndarray]) -> list[dict[str, int]]:
        """Per-env actions as plain ints, one dict per env."""
        cols = {h: [int(x) for x in np.asarray(actions[h]).reshape(-1).tolist()] for h in HEAD_NAMES}
        return [{h: col[i] for h, col in cols.items()} for i in range(self.n_envs)]

    # --- resets ---------------------------------------------------------------------------------
    def reset_envs(self, rows: Sequence[bool], metrics: Mapping[str, np.ndarray]) -> None:
        """Neutral state (epoch 0) for the selected envs, then their first host epoch is recorded."""
        metric_rows = self._metric_rows(metrics)
        for i, selected in enumerate(rows):
            if bool(selected):
                env = self.envs[i]
                env.clear()
                env.record_epoch(metric_rows[i])

    # --- gates (SPEC §8, SEMANTICS "Gates") -----------------------------------------------------
    def gate_g1(self, env: RefEnv, slot: RefSlot) -> bool:
        """GERMINATED -> TRAINING always passes."""
        return True

    def gate_g2(self, env: RefEnv, slot: RefSlot) -> bool:
        """TRAINING -> BLENDING after G2_MIN_EPOCHS in stage: permissive needs measured, healthy,
        non-exploding gradients; strict *instead* needs improvement and an active gradient ratio."""
        if slot.epochs_in_stage < G2_MIN_EPOCHS:
            return False
        if self.cfg.strict_gates:
            improvement = _f32(env.val_acc - slot.accuracy_at_stage_start)
            return improvement >= _f32(G2_STRICT_IMPROVEMENT) and _f32(slot.gradient_ratio) >= _f32(G2_STRICT_GRAD_RATIO)
        return slot.gradient_measured and not slot.has_exploding and _f32(slot.gradient_health) >= _f32(G2_MIN_HEALTH)

    def gate_g3(self, env: RefEnv, slot: RefSlot) -> bool:
        """BLENDING -> HOLDING: the blend has finished its ramp to full alpha."""
        ok = (
            slot.alpha_target >= 1.0 - ALPHA_ATOL
            and slot.alpha_mode == AlphaMode.HOLD
            and abs(slot.alpha - slot.alpha_target) <= ALPHA_ATOL
        )
        if ok and self.cfg.strict_gates:
            ok = slot.epochs_in_stage >= G3_STRICT_MIN_EPOCHS
        return ok

    def gate_g5(self, env: RefEnv, slot: RefSlot) -> bool:
        """HOLDING -> FOSSILIZED: the seed's contribution has been measured (and is large if strict)."""
        ok = slot.contribution_measured
        if ok and self.cfg.strict_gates:
            ok = _f32(slot.contribution) >= _f32(G5_STRICT_CONTRIBUTION)
        return ok

    # --- masks (SPEC §5, §9) --------------------------------------------------------------------
    def slot_by_op(self, env: RefEnv) -> list[list[bool]]:
        """``[6][S]`` validity of each op on each slot of one env."""
        enabled = self.enabled
        n_seeds = sum(1 for slot in env.slots if slot.has_seed)
        seed_limit_hit = self.cfg.max_seeds > 0 and n_seeds >= self.cfg.max_seeds
        germination_blocked = any(
            en and slot.stage in GERMINATE_BLOCKING_STAGES for en, slot in zip(enabled, env.slots)
        )
        advance_off = self.cfg.all_auto_forward
        rows: list[list[bool]] = [[False] * self.n_slots for _ in range(_N_OPS)]
        for s, slot in enumerate(env.slots):
            if not enabled[s]:
                continue
            hold = slot.alpha_mode == AlphaMode.HOLD
            rows[Op.WAIT][s] = True
            rows[Op.GERMINATE][s] = slot.stage == Stage.DORMANT and not germination_blocked and not seed_limit_hit
            rows[Op.SET_ALPHA_TARGET][s] = slot.stage in (Stage.BLENDING, Stage.HOLDING) and hold
            rows[Op.PRUNE][s] = slot.stage in PRUNABLE_STAGES and slot.seed_age >= MIN_PRUNE_AGE and hold
            rows[Op.FOSSILIZE][s] = slot.stage == Stage.HOLDING
            rows[Op.ADVANCE][s] = slot.stage in ADVANCEABLE_STAGES and not advance_off
        return rows

    def env_masks(self, env: RefEnv) -> dict[str, list]:
        """Every action mask of one env as nested lists of bools."""
        by_op = self.slot_by_op(env)
        op = [any(row) for row in by_op]
        blueprint = [b in self.topology_blueprints for b in range(len(Blueprint))]
        choose_style = op[Op.GERMINATE] or op[Op.SET_ALPHA_TARGET]
        style = [choose_style or k == STYLE_DEFAULT for k in range(self.head_sizes["style"])]
        alpha_target = [choose_style or k == ALPHA_TARGET_DEFAULT for k in range(self.head_sizes["alpha_target"])]
        return {
            "op": op,
            "slot_by_op": by_op,
            "blueprint": blueprint,
            "style": style,
            "tempo": [True] * self.head_sizes["tempo"],
            "alpha_target": alpha_target,
            "alpha_speed": [True] * self.head_sizes["alpha_speed"],
            "alpha_curve": [True] * self.head_sizes["alpha_curve"],
        }

    def masks(self) -> dict[str, np.ndarray]:
        """Masks for the current state of every env, stacked to ``[E, ...]`` bool arrays."""
        per_env = [self.env_masks(env) for env in self.envs]
        return {k: np.array([m[k] for m in per_env], dtype=bool) for k in per_env[0]}

    # --- action resolution (SEMANTICS "One transition" step 2) ----------------------------------
    def resolve_action(self, env: RefEnv, act: Mapping[str, int]) -> tuple[int, int, bool]:
        """(executed op, target slot or -1, valid) from the pre-action masks.

        Any head out of range, an (op, slot) pair its slot_by_op row forbids, or GERMINATE with a
        blueprint outside the topology set is executed as WAIT and marked invalid.
        """
        s = act["slot"]
        target = s if 0 <= s < self.n_slots else -1
        if not all(0 <= act[h] < self.head_sizes[h] for h in HEAD_NAMES):
            return int(Op.WAIT), target, False
        op = act["op"]
        if not self.slot_by_op(env)[op][s]:
            return int(Op.WAIT), target, False
        if op == Op.GERMINATE and act["blueprint"] not in self.topology_blueprints:
            return int(Op.WAIT), target, False
        return op, target, True

    # --- ops (SPEC §5, SEMANTICS "Ops"); each returns the action's success ----------------------
    def op_germinate(self, env: RefEnv, s: int, act: Mapping[str, int]) -> bool:
        """DORMANT -> GERMINATED with the chosen blueprint, style, tempo and alpha target."""
        slot = env.slots[s]
        style = act["style"]
        curve = STYLE_CURVE[style]
        slot.transition_to(Stage.GERMINATED, env.val_acc)
        slot.blueprint = act["blueprint"]
        slot.algorithm = int(STYLE_ALGORITHM[style])
        slot.alpha_curve = int(curve)
        slot.alpha_steepness = CURVE_STEEPNESS[curve]
        slot.tempo = TEMPO_EPOCHS[act["tempo"]]
        slot.germination_alpha_target = ALPHA_TARGETS[act["alpha_target"]]
        slot.hold_alpha_at(0.0)
        slot.seed_age = 0
        slot.germination_epoch = env.epoch
        slot.germination_val_acc = env.val_acc
        slot.seed_params = float(blueprint_params(slot.blueprint, self.widths[s]))
        slot.pending_prune = False
        return True

    def op_set_alpha_target(self, env: RefEnv, s: int, act: Mapping[str, int]) -> bool:
        """Retarget a blended seed; a partial target sends a HOLDING seed back to BLENDING."""
        slot = env.slots[s]
        target = ALPHA_TARGETS[act["alpha_target"]]
        if slot.stage == Stage.HOLDING and target < 1.0:
            slot.transition_to(Stage.BLENDING, env.val_acc)
        slot.algorithm = int(STYLE_ALGORITHM[act["style"]])
        curve = act["alpha_curve"]
        slot.retarget(target, ALPHA_SPEED_TICKS[act["alpha_speed"]], curve, CURVE_STEEPNESS[curve])
        return True

    def op_prune(self, env: RefEnv, s: int, act: Mapping[str, int]) -> bool:
        """Prune now (INSTANT or alpha already 0) or ramp alpha down and prune when it reaches 0."""
        slot = env.slots[s]
        steps = ALPHA_SPEED_TICKS[act["alpha_speed"]]
        if steps == 0 or slot.alpha <= 0.0:
            slot.transition_to(Stage.PRUNED, env.val_acc)
            slot.hold_alpha_at(0.0)
            slot.pending_prune = False
            return True
        if slot.stage == Stage.HOLDING:
            slot.transition_to(Stage.BLENDING, env.val_acc)
        curve = act["alpha_curve"]
        slot.retarget(0.0, steps, curve, CURVE_STEEPNESS[curve])
        slot.pending_prune = True
        return True

    def op_fossilize(self, env: RefEnv, s: int, act: Mapping[str, int]) -> bool:
        """HOLDING -> FOSSILIZED (alpha 1 for good) if G5 passes; else nothing and a failure."""
        slot = env.slots[s]
        if not self.gate_g5(env, slot):
            return False
        slot.transition_to(Stage.FOSSILIZED, env.val_acc)  # the controller stays as HOLDING left it
        env.n_fossilized += 1
        return True

    def op_advance(self, env: RefEnv, s: int, act: Mapping[str, int]) -> bool:
        """Try the gate of the slot's stage; on a pass move one stage on (else a failure)."""
        return self.advance_slot(env, env.slots[s])

    def advance_slot(self, env: RefEnv, slot: RefSlot) -> bool:
        """ADVANCE's effect, shared by the op and the auto-advance tick: gate, then move."""
        if slot.stage == Stage.GERMINATED:
            if not self.gate_g1(env, slot):
                return False
            slot.transition_to(Stage.TRAINING, env.val_acc)
            return True
        if slot.stage == Stage.TRAINING:
            if not self.gate_g2(env, slot):
                return False
            slot.transition_to(Stage.BLENDING, env.val_acc)
            # the first ramp: 0 -> germination target over `tempo` ticks with the style's curve
            slot.retarget(slot.germination_alpha_target, slot.tempo, slot.alpha_curve, slot.alpha_steepness)
            return True
        if slot.stage == Stage.BLENDING:
            if not self.gate_g3(env, slot):
                return False
            slot.transition_to(Stage.HOLDING, env.val_acc)
            slot.finish_blend()
            return True
        return False

    def execute_op(self, env: RefEnv, op: int, s: int, act: Mapping[str, int]) -> bool:
        """Dispatch a valid op to its method."""
        if op == Op.WAIT:
            return True
        handler = {
            Op.GERMINATE: self.op_germinate,
            Op.SET_ALPHA_TARGET: self.op_set_alpha_target,
            Op.PRUNE: self.op_prune,
            Op.FOSSILIZE: self.op_fossilize,
            Op.ADVANCE: self.op_advance,
        }[Op(op)]
        return handler(env, s, act)

    # --- tick (SPEC §6, SEMANTICS "Tick") -------------------------------------------------------
    def tick_slot(self, env: RefEnv, slot: RefSlot) -> None:
        """One epoch of one slot, after the op: the original's ``step_epoch``, then the count."""
        cfg = self.cfg
        start = slot.stage
        if start == Stage.PRUNED:
            slot.transition_to(Stage.EMBARGOED, env.val_acc)
            return
        if start == Stage.GERMINATED and cfg.auto_forward_g1:
            self.advance_slot(env, slot)
        elif start == Stage.TRAINING and cfg.auto_forward_g2:
            self.advance_slot(env, slot)  # a seed moved to BLENDING here ramps from the next tick
        elif start == Stage.BLENDING:
            slot.tick_alpha()
            if slot.pending_prune and slot.alpha_mode == AlphaMode.HOLD:
                slot.transition_to(Stage.PRUNED, env.val_acc)
                slot.hold_alpha_at(0.0)
                slot.pending_prune = False
            elif cfg.auto_forward_g3:
                self.advance_slot(env, slot)  # HOLDING in the epoch the ramp completes
        # the epoch count (the original's record_accuracy); a slot pruned just now counts too
        if slot.stage in LIVE_STAGES or slot.stage in (Stage.PRUNED, Stage.EMBARGOED, Stage.RESETTING):
            slot.epochs_in_stage += 1
            slot.seed_age += 1
            if slot.stage == Stage.EMBARGOED and slot.epochs_in_stage >= EMBARGO_EPOCHS:
                slot.transition_to(Stage.RESETTING, env.val_acc)
            elif slot.stage == Stage.RESETTING and slot.epochs_in_stage >= RESETTING_EPOCHS:
                slot.clear()

    def tick_env(self, env: RefEnv) -> None:
        for slot in env.slots:
            self.tick_slot(env, slot)

    # --- transition (SEMANTICS "One transition") ------------------------------------------------
    def transition(self, actions: Mapping[str, np.ndarray], metrics: Mapping[str, np.ndarray]) -> dict:
        """Steps 1-6 for every env; returns executed op, success, the step's reward and the done
        flags per env (a diverged host terminates, the last epoch truncates).

        The reward (of the pre-action state) is also added to ``episode_return``.
        """
        executed = np.zeros(self.n_envs, dtype=np.int64)
        success = np.zeros(self.n_envs, dtype=np.float64)
        rewards = np.zeros(self.n_envs, dtype=np.float64)
        terminated = np.zeros(self.n_envs, dtype=bool)
        truncated = np.zeros(self.n_envs, dtype=bool)
        action_rows = self._action_rows(actions)
        metric_rows = self._metric_rows(metrics)
        for i, env in enumerate(self.envs):
            act = action_rows[i]
            op, s, valid = self.resolve_action(env, act)
            rewards[i] = self.env_reward(env, op, s)
            env.episode_return += rewards[i]
            for slot in env.slots:  # 1. values as of this decision
                slot.previous_alpha = slot.alpha  # so the shock term sees this step's alpha change
                if slot.gradient_measured:  # the next observation's "previous gradient health"
                    slot.previous_gradient_health = slot.gradient_health
            ok = self.execute_op(env, op, s, act) if valid else False  # 2.
            env.last_op = op
            env.last_action_success = 1.0 if ok else 0.0
            self.tick_env(env)  # 3.
            env.epoch += 1  # 4.
            env.record_epoch(metric_rows[i])  # 5.
            terminated[i] = bool(metric_rows[i]["diverged"])
            if terminated[i]:  # SPEC §13: the host diverged, its live seeds collapse
                self.collapse(env)
            truncated[i] = env.epoch >= self.cfg.max_epochs
            settled = self.settlement(env, bool(terminated[i] or truncated[i]))
            settled += DIVERGENCE_PENALTY if terminated[i] else 0.0
            rewards[i] += settled
            env.episode_return += settled
            executed[i] = op
            success[i] = env.last_action_success
        return {"executed_op": executed, "success": success, "reward": rewards,
                "terminated": terminated, "truncated": truncated, "done": terminated | truncated}

    def collapse(self, env: RefEnv) -> None:
        """Catastrophic divergence: every seed not yet FOSSILIZED is pruned at once."""
        for slot in env.slots:
            if slot.stage in PRUNABLE_STAGES:
                slot.transition_to(Stage.PRUNED, env.val_acc)
                slot.hold_alpha_at(0.0)
                slot.pending_prune = False

    # --- reward (SPEC §12, SEMANTICS "Reward") --------------------------------------------------
    def reward(self, actions: Mapping[str, np.ndarray]) -> np.ndarray:
        """Reward of (current pre-action state, action) for every env, in ``cfg.reward_mode``."""
        out = np.zeros(self.n_envs, dtype=np.float64)
        for i, (env, act) in enumerate(zip(self.envs, self._action_rows(actions))):
            op, s, _valid = self.resolve_action(env, act)
            out[i] = self.env_reward(env, op, s)
        return out

    def env_reward(self, env: RefEnv, op: int, s: int) -> float:
        """Reward of one env for the executed op on target slot ``s`` (-1 = no target), from the
        pre-action state (COMMITTED adds :meth:`settlement` once the step is done)."""
        mode = self.cfg.reward_mode
        if mode == "shaped":
            return self.shaped_reward(env, op, s)
        if mode == "committed":
            return self.shaped_reward(env, op, s, committed=True)
        if mode == "sparse":
            return self.sparse_reward(env)
        if mode == "minimal":
            r = self.sparse_reward(env)
            if op == Op.PRUNE and env.slots[s].seed_age < MIN_PRUNE_AGE:
                r -= 0.1
            return r
        if mode == "simplified":
            return self.simplified_reward(env, op, s)
        raise ValueError(f"unknown reward mode {mode!r}")

    def is_last_step(self, env: RefEnv) -> bool:
        return env.epoch == self.cfg.max_epochs - 1

    def pbrs(self, slot: RefSlot | None) -> float:
        """(d) potential-based shaping for a target in a live stage (telescoping form)."""
        if slot is None or slot.stage not in LIVE_STAGES:
            return 0.0
        e = slot.epochs_in_stage
        if e == 0:  # the slot just moved: the previous potential is the old stage's
            phi_prev = phi(slot.previous_stage, slot.previous_epochs_in_stage)
        else:
            phi_prev = phi(slot.stage, e - 1)
        return PBRS_WEIGHT * (GAMMA * phi(slot.stage, e) - phi_prev)

    def credit(self, env: RefEnv, slot: RefSlot) -> tuple[float, float, float]:
        """(attribution A, ratio penalty, synergy if earned) of one seed with a fresh c, as SHAPED
        pays it for a target (before the FOSSILIZE/PRUNE adjustments)."""
        acc = env.val_acc
        I_ = acc - env.acc_committed
        c = slot.contribution
        p = acc - slot.germination_val_acc
        d = _sigmoid(3.0 * I_) if I_ < 0 else 1.0
        if c < 0:
            A = c  # a harmful seed's c is paid as is: no d, no tau
        else:
            if p <= 0:
                A = 0.0
            elif c >= p:
                A = 2.0 * p * c / (p + c)
            else:
                A = c
            A *= d * timing_discount(env.epoch + 1 - slot.seed_age)  # the original's 1-based epoch
        rp = 0.0
        if c > 1.0 and d >= 0.5:
            if I_ > 0.1 and c / I_ > 5.0:
                rp = -min(0.3, 0.1 * (c / I_ - 5.0) / 5.0)
            elif I_ <= 0.1:
                rp = -0.3 * min(1.0, c / 10.0)
        syn = 0.1 * math.tanh(0.5 * slot.interaction_sum) if slot.interaction_sum > 0 and d >= 0.5 else 0.0
        return A, rp, syn

    def escrow(self, env: RefEnv) -> float:
        """COMMITTED's Psi: the credit of every BLENDING/HOLDING seed with a fresh c (c itself
        when c < 0)."""
        total = 0.0
        for slot in env.slots:
            fresh = slot.contribution_measured and slot.epochs_since_measurement == 0
            if slot.stage in (Stage.BLENDING, Stage.HOLDING) and fresh:
                A, rp, syn = self.credit(env, slot)
                total += A if slot.contribution < 0 else max(0.0, A + rp) + (syn if A + rp > 0 else 0.0)
        return total

    def committed_gain(self, env: RefEnv) -> float:
        """J: committed accuracy over the host alone, minus 1 pp per 50,000 fossil parameters."""
        fossil_params = sum(slot.seed_params for slot in env.slots if slot.stage == Stage.FOSSILIZED)
        return env.acc_committed - env.acc_all_seeds_off - fossil_params / FOSSIL_PARAM_PRICE

    def settlement(self, env: RefEnv, done: bool) -> float:
        """COMMITTED's post-step half: gamma Psi(next) (0 at the end) + W J(next)."""
        if self.cfg.reward_mode != "committed":
            return 0.0
        return (0.0 if done else GAMMA * self.escrow(env)) + COMMIT_WEIGHT * self.committed_gain(env)

    def shaped_reward(self, env: RefEnv, op: int, s: int, committed: bool = False) -> float:
        """SHAPED mode: terms (a)-(j) of SPEC §12 as pinned down by SEMANTICS; with ``committed``
        the pre-action part of COMMITTED (SPEC §12b)."""
        acc = env.val_acc
        H = env.host_params
        T = env.slots[s] if s >= 0 else None
        I_ = acc - env.acc_committed
        last = self.is_last_step(env)
        r = 0.0

        # c, and the attribution A of the target seed: terms (a), (b), (c), (e)
        c_known = False
        c = 0.0
        if T is not None and T.stage in PRUNABLE_STAGES:
            c_known = T.contribution_measured and T.epochs_since_measurement == 0
            c = T.contribution
            e = T.epochs_in_stage
            A, rp, syn = 0.0, 0.0, 0.0
            if c_known:
                A, rp, syn = self.credit(env, T)
                if committed and T.stage in (Stage.BLENDING, Stage.HOLDING):  # held in escrow instead
                    A, rp, syn = 0.0, 0.0, 0.0
            elif T.stage in (Stage.BLENDING, Stage.HOLDING):
                A = 0.3 * max(0.0, acc - T.accuracy_at_stage_start)
                # no fresh c: the original computes no discount d, so synergy only needs A > 0
                syn = 0.1 * math.tanh(0.5 * T.interaction_sum) if T.interaction_sum > 0 else 0.0
            if op == Op.FOSSILIZE and I_ < 0:
                A = 0.0
            if op == Op.PRUNE:
                A = -A
            bounded = A + rp  # the ratio penalty stays a penalty for PRUNE
            r += bounded
            # (b) blending a seed while the uncommitted seeds together hurt the host (not in
            # COMMITTED, where J alone judges what is kept)
            if T.stage == Stage.BLENDING and I_ < 0 and not committed:
                r += -0.1 - min(0.05 * e, 0.3)
            # (c) holding a useful seed without deciding (not in COMMITTED, whose escrow leaves
            # nothing to farm)
            held = T.stage == Stage.HOLDING and op not in (Op.FOSSILIZE, Op.PRUNE) and e >= 2 and bounded > 0
            if held and not committed:
                r -= min(0.1 + 0.05 * max(0, e - 2), 0.3)
            # (e) synergy (COMMITTED: part of the escrowed credit only)
            if bounded > 0 and not committed:
                r += syn

        # (d) PBRS
        r += self.pbrs(T)

        # (f) rent on the parameters the blended/held/fossilized seeds add (not in COMMITTED:
        # J prices the fossils' parameters once, and uncommitted seeds are not in its network)
        H_floor = max(H, PARAMS_FLOOR)
        eff = sum(
            RENT_HOST_FRACTION * H + slot.alpha * slot.seed_params
            for slot in env.slots
            if slot.stage in (Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)
        )
        r -= 0.0 if committed else min(0.5 * math.log1p(eff / H_floor), 1.5)

        # (g) alpha shock
        shock = sum((slot.alpha - slot.previous_alpha) ** 2 * slot.seed_params for slot in env.slots)
        r -= min(SHOCK_COEF * shock / H_floor, 1.0)

        # (h) capacity: every seed the original still holds, PRUNED ones excepted
        n_active = sum(1 for slot in env.slots if slot.stage in OCCUPYING_STAGES)
        n_fossil = sum(1 for slot in env.slots if slot.stage == Stage.FOSSILIZED)
        r -= 0.01 * max(0, n_active + n_fossil - 1) + 0.002 * n_fossil

        # (i) op shaping and fees
        r += self.op_shaping(env, op, T, c_known, c, I_)

        # (j) terminal
        if last:
            r += 0.0 if committed else 0.05 * acc
            for slot in env.slots:
                if slot.stage in (Stage.GERMINATED, Stage.TRAINING):
                    r -= 0.3 * GAMMA / GAMMA**slot.seed_age
        if committed:
            r -= self.escrow(env) + COMMIT_WEIGHT * self.committed_gain(env)
        return r

    def op_shaping(self, env: RefEnv, op: int, T: RefSlot | None, c_known: bool, c: float, I_: float) -> float:
        """(i) per-op shaping, fees included."""
        if op == Op.GERMINATE:
            bonus = 0.0 if self.is_last_step(env) else 0.3 * GAMMA * timing_discount(env.epoch + 1)
            return bonus - 0.15
        if op == Op.FOSSILIZE:
            e = T.epochs_in_stage
            ramp = min(1.0, e / 5.0)
            if I_ >= 0:
                r = (0.5 + 0.1 * c) * ramp + FOSSIL_BONUS * ramp if c_known and c >= 1.0 else -0.2
            else:
                r = -0.5 - min(0.2 * abs(I_), 1.0)
                if c_known and c > 0.1 and I_ < -0.2:  # the original's "ransomware" signature
                    r -= 0.3
            return r - 0.01
        if op == Op.PRUNE:
            r = -0.3 * phi(T.stage, T.epochs_in_stage)  # PBRS exit
            age = T.seed_age
            if age < MIN_PRUNE_AGE:
                r -= 0.3 * (MIN_PRUNE_AGE - age)  # and nothing else (the original returns here)
            elif c_known:
                if c < -0.5:
                    r += -0.1 if age < 3 else 0.15
                elif c < 0:
                    r += 0.1
                else:
                    r += max(-0.3 - 0.05 * c, -0.9)
            return r - 0.005
        if op == Op.SET_ALPHA_TARGET:
            return -0.005
        if op == Op.ADVANCE:
            return -0.1 if T.stage == Stage.TRAINING else 0.0
        return 0.0

    def sparse_reward(self, env: RefEnv) -> float:
        """SPARSE: only the final accuracy, minus a price on fossilized parameters."""
        if not self.is_last_step(env):
            return 0.0
        fossil_params = sum(slot.seed_params for slot in env.slots if slot.stage == Stage.FOSSILIZED)
        return _clamp(env.acc_committed / 100.0 - 0.1 * fossil_params / SPARSE_PARAM_SCALE, -1.0, 1.0)

    def simplified_reward(self, env: RefEnv, op: int, s: int) -> float:
        """SIMPLIFIED: PBRS, a fee per non-WAIT op, final accuracy and useful fossils."""
        T = env.slots[s] if s >= 0 else None
        r = self.pbrs(T)
        if op != Op.WAIT:
            r -= 0.01
        if self.is_last_step(env):
            n = sum(
                1
                for slot in env.slots
                if slot.stage == Stage.FOSSILIZED and slot.contribution_measured and slot.contribution > 0
            )
            r += 3.0 * env.val_acc / 100.0 + 2.0 * n
        return r

    # --- observation (SPEC §10, SEMANTICS "Observation details") --------------------------------
    def env_observation(self, env: RefEnv) -> list[float]:
        """Base features then 31 per slot, as plain floats."""
        me = self.cfg.max_epochs
        S = self.n_slots
        pad = HISTORY_LEN - env.history_len  # positions before this were never observed
        obs = [
            min(env.epoch + 1, me) / me,  # the host epoch just trained, 1-based as the original
            _symlog(env.val_loss) / 7.0,
            env.val_acc / 100.0,
        ]
        obs += [(_symlog(x) / 7.0 if j >= pad else -1.0) for j, x in enumerate(env.loss_history)]
        obs += [(x / 100.0 if j >= pad else -1.0) for j, x in enumerate(env.acc_history)]
        for stages in OBS_STAGE_COUNTS:  # FOSSILIZED counts with HOLDING, as the original
            obs.append(sum(1 for slot in env.slots if slot.stage in stages) / S)
        obs.append(env.last_action_success)
        obs += [1.0 if k == env.last_op else 0.0 for k in range(len(Op))]
        for slot in env.slots:
            obs += self.slot_observation(slot)
        return obs

    def slot_observation(self, slot: RefSlot) -> list[float]:
        """31 features of one slot; an empty slot is all zeros."""
        if not slot.has_seed:
            return [0.0] * OBS_SLOT
        me = self.cfg.max_epochs

        def frac(x: int) -> float:
            return min(x, me) / me

        onehot = [0.0] * N_STAGE_ONEHOT
        onehot[stage_onehot_index(slot.stage)] = 1.0
        if slot.alpha_mode == AlphaMode.HOLD:
            alpha_velocity = 0.0
        else:
            alpha_velocity = _clamp((slot.alpha_target - slot.alpha_start) / max(slot.alpha_steps_total, 1), -1.0, 1.0)
        freshness = CF_FRESHNESS_DECAY**slot.epochs_since_measurement if slot.contribution_measured else -1.0
        return [
            1.0,
            *onehot,
            slot.alpha,
            _clamp(slot.contribution / 10.0, -1.0, 1.0),
            _clamp(slot.contribution_velocity / 10.0, -1.0, 1.0),
            slot.tempo / 12.0,
            slot.alpha_target,
            slot.alpha_mode / 2.0,
            frac(slot.alpha_steps_total),
            frac(slot.alpha_steps_done),
            frac(slot.alpha_steps_total - slot.alpha_steps_done),
            alpha_velocity,
            (slot.algorithm - 1) / 2.0,
            _clamp(slot.interaction_sum / 10.0, -1.0, 1.0),
            _symlog(slot.gradient_norm) / 7.0,
            slot.gradient_health if slot.gradient_measured else 0.0,
            float(slot.has_vanishing),
            float(slot.has_exploding),
            slot.previous_gradient_health,
            frac(slot.epochs_in_stage),
            freshness,  # before seed_age, the original's order
            frac(slot.seed_age),
        ]

    def observation(self) -> np.ndarray:
        """``[E, 23 + 31 S]`` float32 observation of every env."""
        obs = np.array([self.env_observation(env) for env in self.envs], dtype=np.float32)
        assert obs.shape == (self.n_envs, OBS_BASE + OBS_SLOT * self.n_slots)
        return obs

    def blueprint_index(self) -> np.ndarray:
        """``[E, S]`` blueprint per slot for the policy's embedding (-1 for empty slots)."""
        return np.array(
            [[slot.blueprint if slot.has_seed else EMPTY_BLUEPRINT_INDEX for slot in env.slots] for env in self.envs],
            dtype=np.int64,
        )

    # --- state export / import ------------------------------------------------------------------
    def export_state(self) -> dict:
        """The state as numpy arrays with state.py's names and dtypes (``[E]``, ``[E,5]``, ``[E,S]``)."""
        out: dict = {}
        for name, (dt, _v, _shape) in ENV_FIELDS.items():
            out[name] = np.array([getattr(env, name) for env in self.envs], dtype=_NP_DTYPE[dt])
        out["slots"] = {
            name: np.array([[getattr(slot, name) for slot in env.slots] for env in self.envs], dtype=_NP_DTYPE[dt])
            for name, (dt, _v) in SLOT_FIELDS.items()
        }
        return out

    def load_state(self, state: Mapping) -> None:
        """Inverse of :meth:`export_state` (e.g. to start the oracle from an engine's state)."""
        for i, env in enumerate(self.envs):
            for name, (dt, _v, _shape) in ENV_FIELDS.items():
                value = np.asarray(state[name])[i]
                if name in _HISTORY_FIELDS:
                    setattr(env, name, [float(x) for x in value])
                else:
                    setattr(env, name, _PY_TYPE[dt](value))
            for s, slot in enumerate(env.slots):
                for name, (dt, _v) in SLOT_FIELDS.items():
                    setattr(slot, name, _PY_TYPE[dt](np.asarray(state["slots"][name])[i, s]))


# ================================================================================================
# Heuristic controller (SPEC §14a), one object per env
# ================================================================================================
from dataclasses import replace as _replace  # noqa: E402

from esper_soa.agents.heuristic import NEVER_PRUNED, HeuristicConfig  # noqa: E402


class RefHeuristic:
    """The §14a heuristic for one env in plain Python: the oracle of ``esper_soa.agents.heuristic``.

    Same rules and interpretations as the tensorized controller (its module docstring lists them);
    masks and gates come from this module's :class:`ReferenceEngine`, not from the batched engine,
    so a test comparing the two checks both. Differences of float32 state fields are rounded to
    float32 (``_f32``) before they meet a threshold, as the tensor code compares them.
    """

    def __init__(self, cfg: EngineConfig, hcfg: HeuristicConfig | None = None) -> None:
        self.cfg = cfg
        self.hcfg = hcfg if hcfg is not None else HeuristicConfig()
        self.rotation: list[int] = list(self.hcfg.rotation(cfg.topology))
        self._oracle = ReferenceEngine(_replace(cfg, n_envs=1))  # masks and gates of one env
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new episode of this env)."""
        self.rotation_index = 0
        self.penalty = [0.0] * len(Blueprint)
        self.epochs_since_prune = NEVER_PRUNED
        self.plateau = 0
        self.prev_acc = 0.0
        self.has_prev = False

    def next_blueprint(self) -> tuple[int, int]:
        """(blueprint, rotation index after germinating it): skip penalised entries, else the least."""
        n = len(self.rotation)
        for k in range(n):
            blueprint = self.rotation[(self.rotation_index + k) % n]
            if self.penalty[blueprint] < _f32(self.hcfg.blueprint_penalty_threshold):
                return blueprint, (self.rotation_index + k + 1) % n
        return min(self.rotation, key=lambda b: self.penalty[b]), self.rotation_index

    def decide_seed(self, env: RefEnv, slot: RefSlot) -> int:
        """The op for the env's live seed (before masking)."""
        h = self.hcfg
        if slot.stage == Stage.GERMINATED:
            return int(Op.ADVANCE)
        since_start = _f32(env.val_acc - slot.accuracy_at_stage_start)
        total = _f32(env.val_acc - slot.accuracy_at_germination)
        if slot.stage in (Stage.TRAINING, Stage.BLENDING):
            failing = slot.epochs_in_stage >= h.prune_after_epochs and (
                since_start < 0 or total <= -_f32(h.accuracy_drop)
            )
            if failing:
                return int(Op.PRUNE)
            gate = self._oracle.gate_g2 if slot.stage == Stage.TRAINING else self._oracle.gate_g3
            return int(Op.ADVANCE) if gate(env, slot) else int(Op.WAIT)
        # HOLDING
        if not slot.contribution_measured:
            return int(Op.WAIT)
        c = slot.contribution
        if c >= _f32(h.fossilize_contribution) and total >= 0:
            return int(Op.FOSSILIZE)
        if c > _f32(h.prune_contribution) and total < 0:
            return int(Op.PRUNE)
        return int(Op.PRUNE) if h.prune_undecided_holding else int(Op.WAIT)

    def act(self, env: RefEnv) -> dict[str, int]:
        """This epoch's decision for ``env`` (all 8 heads as ints); updates the memory once."""
        h = self.hcfg
        # per-epoch memory updates, before deciding
        if self.has_prev and _f32(env.val_acc - self.prev_acc) <= _f32(h.plateau_epsilon):
            self.plateau += 1
        else:
            self.plateau = 0
        self.prev_acc = env.val_acc
        self.has_prev = True
        self.penalty = [_f32(p * _f32(h.blueprint_penalty_decay)) for p in self.penalty]
        self.epochs_since_prune = min(self.epochs_since_prune + 1, NEVER_PRUNED)
        blueprint, rotated_index = self.next_blueprint()

        masks = self._oracle.env_masks(env)
        live = [s for s, slot in enumerate(env.slots) if slot.stage in PRUNABLE_STAGES]
        free = [s for s, ok in enumerate(masks["slot_by_op"][Op.GERMINATE]) if ok]
        if live:  # one live seed at a time: the lowest-index one
            slot = live[0]
            op = self.decide_seed(env, env.slots[slot])
        elif (
            env.epoch >= h.min_epoch
            and self.plateau >= h.plateau_epochs
            and self.epochs_since_prune >= h.prune_cooldown
            and free
        ):
            slot, op = free[0], int(Op.GERMINATE)
        else:
            slot, op = (free[0] if free else 0), int(Op.WAIT)

        action = {
            "op": op,
            "slot": slot,
            "blueprint": blueprint,
            "style": int(h.germinate_style),
            "tempo": int(h.germinate_tempo),
            "alpha_target": int(h.germinate_alpha_target),
            "alpha_speed": int(h.prune_alpha_speed),
            "alpha_curve": int(h.prune_alpha_curve),
        }
        if not self.allowed(action, masks):
            action["op"] = op = int(Op.WAIT)
        if op == Op.WAIT:
            action["slot"] = masks["slot_by_op"][Op.WAIT].index(True)

        # memory follows what was emitted
        if op == Op.GERMINATE:
            self.rotation_index = rotated_index
        if op == Op.PRUNE:
            pruned = env.slots[slot].blueprint
            self.penalty[pruned] = _f32(self.penalty[pruned] + _f32(h.blueprint_penalty_on_prune))
            self.epochs_since_prune = 0
        return action

    @staticmethod
    def allowed(action: Mapping[str, int], masks: Mapping[str, list]) -> bool:
        """Whether the masks allow the action's op on its slot and every head that op uses."""
        op = action["op"]
        if not (masks["op"][op] and masks["slot_by_op"][op][action["slot"]]):
            return False
        heads = {
            Op.GERMINATE: ("blueprint", "style", "tempo", "alpha_target"),
            Op.PRUNE: ("alpha_speed", "alpha_curve"),
        }
        return all(masks[name][action[name]] for name in heads.get(Op(op), ()))


def ref_heuristic_actions(heuristics: Sequence[RefHeuristic], state: Mapping) -> dict[str, np.ndarray]:
    """Decisions of one :class:`RefHeuristic` per env for an exported state (numpy, state.py names).

    The state is loaded into a fresh :class:`ReferenceEngine`, so it may come from the batched
    engine (``{k: v.numpy()}`` of ``Engine.state``) or from ``ReferenceEngine.export_state``.
    """
    cfg = heuristics[0].cfg
    engine = ReferenceEngine(cfg)
    engine.load_state(state)
    rows = [h.act(env) for h, env in zip(heuristics, engine.envs, strict=True)]
    return {name: np.array([row[name] for row in rows], dtype=np.int64) for name in HEAD_NAMES}


__all__ += ["RefHeuristic", "ref_heuristic_actions"]
