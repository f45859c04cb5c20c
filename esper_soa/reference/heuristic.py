"""The SPEC §14a heuristic controller per env in plain Python: the oracle of :mod:`esper_soa.agents.heuristic`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace as _replace

import numpy as np

from esper_soa.core.config import EngineConfig
from esper_soa.core.heuristic_config import NEVER_PRUNED, HeuristicConfig
from esper_soa.core.spec import (
    HEAD_NAMES,
    PRUNABLE_STAGES,
    Blueprint,
    Op,
    Stage,
)
from esper_soa.reference.lifecycle import ReferenceEngine
from esper_soa.reference.state import RefEnv, RefSlot, _f32


class RefHeuristic:
    """The §14a heuristic for one env in plain Python: the oracle of ``esper_soa.agents.heuristic``.

    Same rules and interpretations as the tensorized controller (docs/SEMANTICS.md, "Heuristic controller");
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


__all__ = ["RefHeuristic", "ref_heuristic_actions"]
