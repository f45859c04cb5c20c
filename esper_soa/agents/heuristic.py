"""Rule-based heuristic controller of SPEC §14a, tensorized over envs.

The baseline every learned policy is compared with. One decision per env per call (= per epoch),
acting on one live seed at a time:

- **No live seed** (no slot in GERMINATED..HOLDING): GERMINATE the next blueprint of the
  topology's rotation on the lowest-index free slot when ``epoch >= min_epoch``, accuracy has
  plateaued for ``>= plateau_epochs`` epochs, the controller's last prune is ``>= prune_cooldown``
  epochs ago and the GERMINATE mask allows some slot. Otherwise WAIT.
- **Live seed** (the lowest-index slot in GERMINATED..HOLDING is the target):
  GERMINATED -> ADVANCE. TRAINING / BLENDING -> PRUNE if it is *failing*, else ADVANCE if the
  stage's gate (G2 / G3, with the engine's gate mode) passes, else WAIT. HOLDING -> WAIT until the
  contribution is measured; then FOSSILIZE if it is ``>= fossilize_contribution`` and the total
  improvement is ``>= 0``; PRUNE if it is ``> prune_contribution`` but the total improvement is
  ``< 0`` (the host merely became dependent on the seed); otherwise PRUNE too (see below).
- Every other case WAITs, and so does any chosen action the masks forbid (the engine would
  execute it as WAIT anyway; emitting WAIT keeps the controller's memory equal to what happened).

Heads: GERMINATE uses ``germinate_style`` / ``germinate_tempo`` / ``germinate_alpha_target``
(SIGMOID_ADD, STANDARD, FULL), PRUNE uses ``prune_alpha_speed`` INSTANT (curve LINEAR, irrelevant
at INSTANT). Heads an op does not use still carry valid values: the defaults above, the rotation's
next blueprint, and for WAIT the first enabled slot.

How §14a is read where its text leaves room (plateau, failing, the undecided HOLDING seed,
blueprint penalty, prune cooldown, memory, transformer rotation): docs/SEMANTICS.md,
"Heuristic controller".

``heuristic_step`` is a pure function of (memory, state, masks): branch-free ``torch.where``
logic, no host syncs, so it compiles with ``fullgraph=True`` next to the engine's step.
``esper_soa.reference.heuristic.RefHeuristic`` implements the same rules per env in plain Python.
"""

from __future__ import annotations

import functools

import torch
from tensordict import TensorDictBase

from esper_soa.core.config import EngineConfig
from esper_soa.core.heuristic_config import NEVER_PRUNED, HeuristicConfig
from esper_soa.core.lifecycle import gate_g2, gate_g3
from esper_soa.core.masks import head_views, slot_mask_given_op
from esper_soa.core.spec import (
    PRUNABLE_STAGES,
    Blueprint,
    Op,
    Stage,
    stage_in,
)
from esper_soa.core.state import State

N_BLUEPRINTS = len(Blueprint)

Memory = dict  # {"rotation_index": [E] i64, "penalty": [E,13] f32, "epochs_since_prune": [E] i64,
#                 "plateau": [E] i64, "prev_acc": [E] f32, "has_prev": [E] bool}


class HeuristicTables:
    """Static tensors of one controller on the engine's device."""

    def __init__(self, cfg: EngineConfig, hcfg: HeuristicConfig) -> None:
        self.device = cfg.torch_device
        self.rotation = torch.tensor(hcfg.rotation(cfg.topology), dtype=torch.int64, device=self.device)


def initial_memory(n_envs: int, device: torch.device | str) -> Memory:
    """The memory of a controller that has seen nothing (one row per env)."""
    dev = torch.device(device)
    return {
        "rotation_index": torch.zeros(n_envs, dtype=torch.int64, device=dev),
        "penalty": torch.zeros(n_envs, N_BLUEPRINTS, dtype=torch.float32, device=dev),
        "epochs_since_prune": torch.full((n_envs,), NEVER_PRUNED, dtype=torch.int64, device=dev),
        "plateau": torch.zeros(n_envs, dtype=torch.int64, device=dev),
        "prev_acc": torch.zeros(n_envs, dtype=torch.float32, device=dev),
        "has_prev": torch.zeros(n_envs, dtype=torch.bool, device=dev),
    }


def reset_memory(memory: Memory, rows: torch.Tensor) -> Memory:
    """Fresh memory for the envs in ``rows`` ([E] bool), the other rows untouched."""
    fresh = initial_memory(rows.shape[0], rows.device)
    return {k: torch.where(rows.reshape((-1,) + (1,) * (v.dim() - 1)), fresh[k], v) for k, v in memory.items()}


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[e, index[e]]`` for every env (x is ``[E, n]``, index ``[E]``)."""
    return x.gather(1, index[:, None]).squeeze(1)


def _first(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row (0 when none)."""
    return mask.to(torch.int64).argmax(dim=1)


def allowed_or_wait(action: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """``action["op"]`` where the masks allow the whole action (the op on its slot, GERMINATE's and
    PRUNE's heads), WAIT elsewhere: scripted controllers never emit a masked action."""
    op, slot = action["op"], action["slot"]
    heads = head_views(masks)
    row = slot_mask_given_op(masks["slot_by_op"], op)
    allowed = _at(row, slot) & _at(heads["op"], op)
    is_germinate = op == int(Op.GERMINATE)
    is_prune = op == int(Op.PRUNE)
    for name in ("blueprint", "style", "tempo", "alpha_target"):
        allowed = allowed & (~is_germinate | _at(heads[name], action[name]))
    for name in ("alpha_speed", "alpha_curve"):
        allowed = allowed & (~is_prune | _at(heads[name], action[name]))
    return torch.where(allowed, op, torch.full_like(op, int(Op.WAIT)))


def next_blueprint(
    memory: Memory, penalty: torch.Tensor, rotation: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blueprint [E], rotation index after germinating it [E]): the first rotation entry from the
    pointer whose penalty is below ``threshold``; if none, the least-penalised entry."""
    n = rotation.shape[0]
    index = memory["rotation_index"]
    order = (index[:, None] + torch.arange(n, device=index.device)[None, :]) % n  # [E, n]
    candidates = rotation[order]
    ok = penalty.gather(1, candidates) < threshold
    k = _first(ok)
    any_ok = ok.any(dim=1)
    fallback = rotation[penalty[:, rotation].argmin(dim=1)]
    blueprint = torch.where(any_ok, _at(candidates, k), fallback)
    new_index = torch.where(any_ok, (index + k + 1) % n, index)
    return blueprint, new_index


def heuristic_step(
    memory: Memory,
    state: State,
    masks: dict[str, torch.Tensor],
    tables: HeuristicTables,
    hcfg: HeuristicConfig,
    cfg: EngineConfig,
) -> tuple[dict[str, torch.Tensor], Memory]:
    """One decision per env (all 8 heads, int64 ``[E]``) and the updated memory; pure."""
    sl = state["slots"]
    val_acc = state["val_acc"]
    n_envs, n_slots = sl["stage"].shape

    def const(value: int) -> torch.Tensor:
        return torch.full((n_envs,), int(value), dtype=torch.int64, device=val_acc.device)

    # --- per-epoch memory updates, before deciding
    flat = memory["has_prev"] & ((val_acc - memory["prev_acc"]) <= hcfg.plateau_epsilon)
    plateau = torch.where(flat, memory["plateau"] + 1, torch.zeros_like(memory["plateau"]))
    penalty = memory["penalty"] * hcfg.blueprint_penalty_decay
    since_prune = (memory["epochs_since_prune"] + 1).clamp(max=NEVER_PRUNED)
    blueprint, rotated_index = next_blueprint(memory, penalty, tables.rotation, hcfg.blueprint_penalty_threshold)

    # --- the live seed: lowest-index slot in GERMINATED..HOLDING
    live = stage_in(sl["stage"], PRUNABLE_STAGES)
    any_live = live.any(dim=1)
    target = _first(live)
    stage = _at(sl["stage"], target)
    since_start = val_acc - _at(sl["accuracy_at_stage_start"], target)
    total = val_acc - _at(sl["accuracy_at_germination"], target)
    failing = (_at(sl["epochs_in_stage"], target) >= hcfg.prune_after_epochs) & (
        (since_start < 0) | (total <= -hcfg.accuracy_drop)
    )
    g2 = _at(gate_g2(state, cfg), target)
    g3 = _at(gate_g3(state, cfg), target)
    measured = _at(sl["contribution_measured"], target) != 0
    contribution = _at(sl["contribution"], target)
    fossilize = measured & (contribution >= hcfg.fossilize_contribution) & (total >= 0)
    hostage = measured & (contribution > hcfg.prune_contribution) & (total < 0)
    undecided = measured & ~fossilize & ~hostage
    prune_holding = hostage | (undecided & hcfg.prune_undecided_holding)

    wait, advance, prune = const(Op.WAIT), const(Op.ADVANCE), const(Op.PRUNE)
    op_training = torch.where(failing, prune, torch.where(g2, advance, wait))
    op_blending = torch.where(failing, prune, torch.where(g3, advance, wait))
    op_holding = torch.where(fossilize, const(Op.FOSSILIZE), torch.where(prune_holding, prune, wait))
    op_live = torch.where(
        stage == int(Stage.GERMINATED),
        advance,
        torch.where(
            stage == int(Stage.TRAINING),
            op_training,
            torch.where(stage == int(Stage.BLENDING), op_blending, op_holding),
        ),
    )

    # --- no live seed: germinate on a plateau
    slot_by_op = masks["slot_by_op"]
    free = slot_by_op[:, int(Op.GERMINATE), :]
    germinate = (
        (state["epoch"] >= hcfg.min_epoch)
        & (plateau >= hcfg.plateau_epochs)
        & (since_prune >= hcfg.prune_cooldown)
        & free.any(dim=1)
    )
    op = torch.where(any_live, op_live, torch.where(germinate, const(Op.GERMINATE), wait))
    slot = torch.where(any_live, target, _first(free))

    # --- heads, then the masks: anything forbidden becomes WAIT
    action = {
        "op": op,
        "slot": slot,
        "blueprint": blueprint,
        "style": const(hcfg.germinate_style),
        "tempo": const(hcfg.germinate_tempo),
        "alpha_target": const(hcfg.germinate_alpha_target),
        "alpha_speed": const(hcfg.prune_alpha_speed),
        "alpha_curve": const(hcfg.prune_alpha_curve),
    }
    op = allowed_or_wait(action, masks)
    action["op"] = op
    action["slot"] = torch.where(op == int(Op.WAIT), _first(slot_by_op[:, int(Op.WAIT), :]), slot)

    # --- memory follows what was emitted
    germinated = op == int(Op.GERMINATE)
    pruned = op == int(Op.PRUNE)
    pruned_blueprint = _at(sl["blueprint"], target)
    hit = pruned[:, None] & (torch.arange(N_BLUEPRINTS, device=op.device)[None, :] == pruned_blueprint[:, None])
    new_memory = {
        "rotation_index": torch.where(germinated, rotated_index, memory["rotation_index"]),
        "penalty": penalty + hit.to(penalty.dtype) * hcfg.blueprint_penalty_on_prune,
        "epochs_since_prune": torch.where(pruned, torch.zeros_like(since_prune), since_prune),
        "plateau": plateau,
        "prev_acc": val_acc,
        "has_prev": torch.ones_like(memory["has_prev"]),
    }
    return action, new_memory


class HeuristicController:
    """The §14a controller for a batch of envs; call :meth:`act` once per engine step.

    The memory lives in tensors on the engine's device (``self.memory``); ``act`` replaces it, never
    mutates it in place. With ``compile`` (default ``cfg.compile``) the step runs under
    ``torch.compile(fullgraph=True)``.
    """

    def __init__(self, cfg: EngineConfig, hcfg: HeuristicConfig | None = None, compile: bool | None = None) -> None:
        self.cfg = cfg
        self.hcfg = hcfg if hcfg is not None else HeuristicConfig()
        self.device = cfg.torch_device
        self.tables = HeuristicTables(cfg, self.hcfg)
        self.memory: Memory = initial_memory(cfg.n_envs, self.device)
        self._step = functools.partial(heuristic_step, tables=self.tables, hcfg=self.hcfg, cfg=cfg)
        if cfg.compile if compile is None else compile:
            self._step = torch.compile(self._step, fullgraph=True)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the envs in ``rows`` ([E] bool; default all): call with the engine's reset."""
        if rows is None:
            rows = torch.ones(self.cfg.n_envs, dtype=torch.bool, device=self.device)
        if rows.shape != (self.cfg.n_envs,) or rows.dtype != torch.bool:
            raise ValueError(
                f"HeuristicController.reset rows: expected a bool tensor of shape ({self.cfg.n_envs},), "
                f"got {rows.dtype} {tuple(rows.shape)}"
            )
        self.memory = reset_memory(self.memory, rows.to(self.device))

    def act(self, state: State | TensorDictBase, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decision of every env for the current state and masks (all 8 heads, int64 ``[E]``)."""
        if isinstance(state, TensorDictBase):
            state = state.to_dict()
        action, self.memory = self._step(self.memory, state, masks)
        return action
