"""Scripted controllers that probe the reward: farms that try to earn without committing, and an
honest reference (issue 13; SPEC §12b). Any reward that claims integrity must rank them by the
real objective J_final (committed accuracy gain minus the parameter price), not by what they farm.

Every controller follows one seed in one slot through the lifecycle and differs only in what it
does once the seed is blended:

- ``farm_blending``: ramp to alpha 1 and stay BLENDING, WAITing on the seed (never ADVANCE to HOLDING);
- ``farm_holding``: reach HOLDING and WAIT on the seed there, never deciding;
- ``farm_late``: as ``farm_holding``, then FOSSILIZE in the last ``late_epochs`` epochs;
- ``honest``: in HOLDING for ``hold_epochs`` epochs, FOSSILIZE when c >= ``commit_contribution``
  else PRUNE, then the next non-fossil slot (largest first).

The farms come in ``_largest`` / ``_smallest`` flavours (the widest / narrowest enabled slot). Like
the heuristic they are pure tensor functions of the engine state and masks (no host sync), and
they only emit actions the masks allow (anything else becomes WAIT on the same slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper_soa.agents.heuristic import HeuristicConfig, _at, _first, allowed_or_wait
from esper_soa.core.config import EngineConfig
from esper_soa.core.lifecycle import gate_g2, gate_g3
from esper_soa.core.masks import head_views
from esper_soa.core.spec import HEAD_NAMES, Op, Stage, slot_widths
from esper_soa.core.state import State

FARMS = ("farm_blending", "farm_holding", "farm_late")
ADVERSARIES = tuple(f"{f}_{size}" for f in FARMS for size in ("largest", "smallest")) + ("honest",)


@dataclass(frozen=True)
class AdversaryConfig:
    """What a scripted controller does with its seed (see the module docstring)."""

    stay: Stage = Stage.HOLDING  # the stage it farms in (BLENDING or HOLDING)
    late_epochs: int = 0  # > 0: FOSSILIZE once fewer than this many epochs are left
    honest: bool = False
    hold_epochs: int = 5
    commit_contribution: float = 1.0
    largest: bool = True


def adversary_config(name: str) -> AdversaryConfig:
    """The config of one of :data:`ADVERSARIES`; a clear error for anything else."""
    if name not in ADVERSARIES:
        raise ValueError(f"adversary: expected one of {ADVERSARIES}, got {name!r}")
    if name == "honest":
        return AdversaryConfig(honest=True)
    farm, size = name.rsplit("_", 1)
    stay = Stage.BLENDING if farm == "farm_blending" else Stage.HOLDING
    return AdversaryConfig(stay=stay, late_epochs=10 if farm == "farm_late" else 0, largest=size == "largest")


def wait_action(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """WAIT for every env (on a slot WAIT allows), every other head at its first valid value: the
    host-alone controller every seed is judged against."""
    heads = head_views(masks)
    action = {h: heads[h].to(torch.int64).argmax(-1) for h in HEAD_NAMES if h not in ("op", "slot")}
    action["op"] = torch.full_like(action["blueprint"], int(Op.WAIT))
    action["slot"] = masks["slot_by_op"][..., int(Op.WAIT), :].to(torch.int64).argmax(-1)
    return {h: action[h] for h in HEAD_NAMES}


def adversary_step(
    state: State, masks: dict[str, torch.Tensor], acfg: AdversaryConfig, cfg: EngineConfig
) -> dict[str, torch.Tensor]:
    """One decision per env (all 8 heads, int64 ``[E]``); pure and sync-free."""
    sl = state["slots"]
    stage_all = sl["stage"]
    n_envs, n_slots = stage_all.shape
    dev = stage_all.device
    hcfg = HeuristicConfig()

    def const(value: int) -> torch.Tensor:
        return torch.full((n_envs,), int(value), dtype=torch.int64, device=dev)

    # the slot: fixed by width for the farms; for the honest controller the widest non-fossil one
    widths = torch.tensor(slot_widths(cfg.topology, n_slots), dtype=torch.float32, device=dev)
    enabled = torch.tensor(cfg.slots_enabled, device=dev)
    order = torch.argsort(widths if not acfg.largest else -widths, stable=True)  # preferred first
    candidate = enabled[order][None, :].expand(n_envs, n_slots)
    if acfg.honest:
        candidate = candidate & (stage_all[:, order] != int(Stage.FOSSILIZED))
    slot = order[_first(candidate)]
    stage = _at(stage_all, slot)
    e = _at(sl["epochs_in_stage"], slot)
    fresh = (_at(sl["contribution_measured"], slot) != 0) & (_at(sl["epochs_since_measurement"], slot) == 0)
    c = _at(sl["contribution"], slot)

    wait, advance = const(Op.WAIT), const(Op.ADVANCE)
    in_holding = stage == int(Stage.HOLDING)
    if acfg.honest:
        judged = in_holding & (e >= acfg.hold_epochs) & fresh
        op_holding = torch.where(
            judged, torch.where(c >= acfg.commit_contribution, const(Op.FOSSILIZE), const(Op.PRUNE)), wait
        )
    elif acfg.late_epochs > 0:
        late = state["epoch"] >= cfg.max_epochs - acfg.late_epochs
        op_holding = torch.where(late, const(Op.FOSSILIZE), wait)
    else:
        op_holding = wait
    blending = stage == int(Stage.BLENDING)
    # ADVANCE only when its gate passes (a failed ADVANCE from TRAINING pays a fee), as the heuristic
    g2 = _at(gate_g2(state, cfg), slot)
    g3 = _at(gate_g3(state, cfg), slot)
    stays_blending = acfg.stay == Stage.BLENDING and not acfg.honest
    op_blending = wait if stays_blending else torch.where(g3, advance, wait)
    op = torch.where(
        stage == int(Stage.DORMANT),
        const(Op.GERMINATE),
        torch.where(
            stage == int(Stage.GERMINATED),
            advance,
            torch.where(
                stage == int(Stage.TRAINING),
                torch.where(g2, advance, wait),
                torch.where(blending, op_blending, torch.where(in_holding, op_holding, wait)),
            ),
        ),
    )
    action = {
        "op": op,
        "slot": slot,
        "blueprint": const(hcfg.rotation(cfg.topology)[0]),
        "style": const(hcfg.germinate_style),
        "tempo": const(hcfg.germinate_tempo),
        "alpha_target": const(hcfg.germinate_alpha_target),
        "alpha_speed": const(hcfg.prune_alpha_speed),
        "alpha_curve": const(hcfg.prune_alpha_curve),
    }
    action["op"] = allowed_or_wait(action, masks)
    return action
