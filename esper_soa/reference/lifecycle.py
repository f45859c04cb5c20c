"""Plain-Python reference oracle of the seed lifecycle (SPEC.md + docs/SEMANTICS.md): :class:`ReferenceEngine`.

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

The per-env state is :mod:`.state`, the reward methods :mod:`.reward` (a mixin of the engine).
"""

from __future__ import annotations

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
    CURVE_STEEPNESS,
    EMBARGO_EPOCHS,
    EMPTY_BLUEPRINT_INDEX,
    G2_MIN_EPOCHS,
    G2_MIN_HEALTH,
    G2_STRICT_GRAD_RATIO,
    G2_STRICT_IMPROVEMENT,
    G3_STRICT_MIN_EPOCHS,
    G5_STRICT_CONTRIBUTION,
    GERMINATE_BLOCKING_STAGES,
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
    blueprint_params,
    head_sizes,
    slot_widths,
    stage_onehot_index,
)
from esper_soa.core.reward import DIVERGENCE_PENALTY
from esper_soa.core.state import ENV_FIELDS, SLOT_FIELDS
from esper_soa.reference.reward import RewardOracle
from esper_soa.reference.state import (
    _HISTORY_FIELDS,
    _NP_DTYPE,
    _PY_TYPE,
    RefEnv,
    RefSlot,
    _clamp,
    _f32,
    _symlog,
)

_N_OPS = len(Op)
_METRIC_ENV = ("val_loss", "val_acc", "acc_all_seeds_off", "acc_committed", "host_params")
_METRIC_SLOT_FLOATS = ("acc_without_slot", "interaction_sum", "gradient_norm", "gradient_health", "gradient_ratio")
_METRIC_SLOT_BOOLS = ("has_vanishing", "has_exploding")

__all__ = ["ReferenceEngine"]


# ================================================================================================
# Engine
# ================================================================================================
class ReferenceEngine(RewardOracle):
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
