"""Reward of the plain-Python reference (SPEC §12, SEMANTICS "Reward"), per env.

:class:`RewardOracle` holds :class:`~esper_soa.reference.lifecycle.ReferenceEngine`'s reward
methods (a mixin, so the engine stays one object with the batched engine's contract). The
constants are :mod:`esper_soa.core.reward`'s, named once for both implementations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from esper_soa.core.config import EngineConfig
from esper_soa.core.reward import (
    COMMIT_WEIGHT,
    FOSSIL_BONUS,
    FOSSIL_PARAM_PRICE,
    OCCUPYING_STAGES,
    PARAMS_FLOOR,
    PBRS_WEIGHT,
    PHI_BASE,
    PHI_EPOCH_CAP,
    PHI_EPOCH_RATE,
    RENT_HOST_SHARE,
    SHOCK_COEF,
    SPARSE_PARAM_SCALE,
    TIMING_FULL_EPOCH,
)
from esper_soa.core.spec import (
    GAMMA,
    LIVE_STAGES,
    MIN_PRUNE_AGE,
    PRUNABLE_STAGES,
    Op,
    Stage,
)
from esper_soa.reference.state import RefEnv, RefSlot, _clamp, _sigmoid


def phi(stage: int, epochs_in_stage: int) -> float:
    """Stage potential Phi(stage, e) of SPEC §12 (stages without a listed base have base 0)."""
    return PHI_BASE.get(Stage(stage), 0.0) + min(PHI_EPOCH_RATE * epochs_in_stage, PHI_EPOCH_CAP)


def timing_discount(g: int) -> float:
    """tau(g): credit for seeds germinated in the first 10 epochs is discounted (SPEC §12)."""
    return 1.0 if g >= TIMING_FULL_EPOCH else 0.4 + 0.06 * g




class RewardOracle:
    """The reward methods of :class:`~esper_soa.reference.lifecycle.ReferenceEngine` (mixin)."""

    cfg: EngineConfig
    n_envs: int
    envs: list[RefEnv]

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
            RENT_HOST_SHARE * H + slot.alpha * slot.seed_params
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

