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

Interpretations of §14a (where its text leaves room):

- *Plateau*: per call, ``gain = val_acc - previous val_acc``; a gain ``<= plateau_epsilon``
  (0.5 pp: just above the surrogate's per-epoch noise on a gain, ~0.42 pp, so a flat host
  registers while a host still learning >= 1 pp/epoch does not) extends the plateau counter, a
  larger gain resets it to 0. The first call after a reset has no previous accuracy: counter 0.
- *Failing* (TRAINING/BLENDING): ``epochs_in_stage >= prune_after_epochs`` and (improvement since
  stage start ``val_acc - accuracy_at_stage_start < 0`` or the accuracy dropped by
  ``>= accuracy_drop`` pp since germination: ``val_acc - accuracy_at_germination <= -2``).
  A failing BLENDING seed whose alpha ramp is in flight cannot be pruned (mask: alpha_mode HOLD),
  so it WAITs; it does not fall through to ADVANCE (whose gate could not pass mid-ramp anyway).
  A TRAINING seed whose G2 never passes (unhealthy gradients) while the host keeps improving is
  never failing either, so it stays in TRAINING: §14a has no timeout and we add none.
- *Total improvement* (HOLDING) is ``val_acc - accuracy_at_germination``.
- *HOLDING, measured but neither rule fires* (contribution in ``(0.1, 0.5)`` with total
  improvement ``>= 0``, or contribution ``<= 0.1``): §14a's "else WAIT until contribution is
  measured" only covers the unmeasured case, so this one is open. We PRUNE, as the original
  controller did: read literally as WAIT, a seed that hurts the host (contribution < 0) while
  the host itself keeps learning (total improvement > 0) sits in HOLDING for the rest of the
  episode and, one live seed at a time, blocks every further germination (a quarter of the envs
  of a 150-epoch surrogate episode). ``prune_undecided_holding=False`` gives the literal reading.
  With the default the 0.1 threshold only names the reason for a prune, not the decision.
- *Blueprint penalty*: once per call all penalties are halved first, the skip test then reads
  the halved values (skip while ``>= 3``), and a PRUNE emitted by this call adds 2 to the pruned
  seed's blueprint. With the default numbers one prune never reaches the threshold (2 -> 1 ->
  ...), so a blueprint is only skipped after repeated prunes in quick succession; the mechanism
  is exact and tested with larger penalties. The rotation pointer advances past every skipped
  entry, and when every rotation entry is penalised the least-penalised one (first in rotation
  order) is used and the pointer does not move (the original's behaviour).
- *Prune cooldown*: a counter of calls since the controller's last emitted PRUNE (starts
  "long ago"). In this engine an INSTANT prune also blocks germination env-wide for 6 epochs
  through the masks (EMBARGOED 5 + RESETTING 1), so the 5-epoch cooldown never binds with the
  default heads; it is kept for parity with the original and for other prune speeds.
- *Memory* is updated from what the controller emitted (after masking): the rotation advances
  only on an emitted GERMINATE, penalty and cooldown only on an emitted PRUNE (a valid PRUNE
  always executes). ``act`` must be called once per env step, and ``reset(rows)`` together with
  the engine's reset of the same rows.
- *Transformer rotation*: (LORA, MLP, ATTENTION, NORM, MLP_SMALL) mirrors the cnn rotation role
  by role: a light adapter, a heavy module, attention, normalisation, a small cheap module.

``heuristic_step`` is a pure function of (memory, state, masks): branch-free ``torch.where``
logic, no host syncs, so it compiles with ``fullgraph=True`` next to the engine's step.
``esper_soa.reference.oracle.RefHeuristic`` implements the same rules per env in plain Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase

from esper_soa.core.config import EngineConfig
from esper_soa.core.lifecycle import gate_g2, gate_g3
from esper_soa.core.masks import SLOT, head_views, masks_given_op
from esper_soa.core.spec import (
    ALPHA_SPEED_TICKS,
    ALPHA_TARGETS,
    PRUNABLE_STAGES,
    TEMPO_EPOCHS,
    TOPOLOGY_BLUEPRINTS,
    AlphaCurve,
    Blueprint,
    Op,
    Stage,
    Style,
    stage_in,
)
from esper_soa.core.state import State

N_BLUEPRINTS = len(Blueprint)
NEVER_PRUNED = 1_000_000  # epochs_since_prune of a controller that has not pruned (saturates here)

Memory = dict  # {"rotation_index": [E] i64, "penalty": [E,13] f32, "epochs_since_prune": [E] i64,
#                 "plateau": [E] i64, "prev_acc": [E] f32, "has_prev": [E] bool}


@dataclass(frozen=True)
class HeuristicConfig:
    """Every constant of the §14a controller (accuracies in percentage points, times in epochs)."""

    plateau_epsilon: float = 0.5  # an epoch-to-epoch val_acc gain <= this counts as no gain
    plateau_epochs: int = 3  # consecutive no-gain epochs that make a plateau
    min_epoch: int = 5  # no germination before this epoch
    prune_cooldown: int = 5  # no germination until this many epochs after the controller's last prune
    blueprint_penalty_on_prune: float = 2.0  # added to a blueprint's penalty when its seed is pruned
    blueprint_penalty_decay: float = 0.5  # per-epoch factor on every penalty
    blueprint_penalty_threshold: float = 3.0  # a blueprint is skipped while its penalty is >= this
    prune_after_epochs: int = 5  # TRAINING/BLENDING seeds are judged from this many epochs in stage
    accuracy_drop: float = 2.0  # prune when val_acc fell this much below accuracy_at_germination
    fossilize_contribution: float = 0.5  # HOLDING: fossilize from this contribution (with total >= 0)
    prune_contribution: float = 0.1  # HOLDING: prune above this contribution when total < 0
    prune_undecided_holding: bool = True  # prune a measured HOLDING seed no rule fossilizes (False: WAIT)
    cnn_rotation: tuple[int, ...] = (
        Blueprint.CONV_LIGHT,
        Blueprint.CONV_HEAVY,
        Blueprint.ATTENTION,
        Blueprint.NORM,
        Blueprint.DEPTHWISE,
    )
    transformer_rotation: tuple[int, ...] = (
        Blueprint.LORA,
        Blueprint.MLP,
        Blueprint.ATTENTION,
        Blueprint.NORM,
        Blueprint.MLP_SMALL,
    )
    germinate_style: int = Style.SIGMOID_ADD
    germinate_tempo: int = 1  # index into TEMPO_EPOCHS: STANDARD (5 epochs)
    germinate_alpha_target: int = 2  # index into ALPHA_TARGETS: FULL
    prune_alpha_speed: int = 0  # index into ALPHA_SPEED_TICKS: INSTANT
    prune_alpha_curve: int = AlphaCurve.LINEAR

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"HeuristicConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("plateau_epochs", "min_epoch", "prune_cooldown", "prune_after_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "an int >= 0")
        if not 0.0 < self.blueprint_penalty_decay <= 1.0:
            raise bad("blueprint_penalty_decay", "a factor in (0, 1]")
        for name, n in (
            ("germinate_style", len(Style)),
            ("germinate_tempo", len(TEMPO_EPOCHS)),
            ("germinate_alpha_target", len(ALPHA_TARGETS)),
            ("prune_alpha_speed", len(ALPHA_SPEED_TICKS)),
            ("prune_alpha_curve", len(AlphaCurve)),
        ):
            if not 0 <= int(getattr(self, name)) < n:
                raise bad(name, f"an index in [0, {n})")
        for topology in TOPOLOGY_BLUEPRINTS:
            rotation = self.rotation(topology)
            if not rotation or any(b not in TOPOLOGY_BLUEPRINTS[topology] for b in rotation):
                allowed = TOPOLOGY_BLUEPRINTS[topology]
                raise bad(f"{topology}_rotation", f"a non-empty tuple of {topology} blueprints {allowed}")

    def rotation(self, topology: str) -> tuple[int, ...]:
        """Blueprint codes germinated in turn for ``topology``."""
        return tuple(int(b) for b in getattr(self, f"{topology}_rotation"))


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
    row = masks_given_op(masks["head"], masks["slot_by_op"], op)[:, SLOT]
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
