"""One lifecycle transition: SPEC §4 steps 3-6 given the dynamics' metrics, as a pure function.

``transition`` is what the engine compiles (with the dynamics and reward around it) and what the
differential tests compare against the per-env reference oracle.
"""

from __future__ import annotations

import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.features import observe
from esper_soa.core.lifecycle import apply_op, record_epoch, tick
from esper_soa.core.masks import mask_flags
from esper_soa.core.reward import committed_gain
from esper_soa.core.spec import SpecTables
from esper_soa.core.state import State, slot_major


def act(
    state: State, action: dict[str, torch.Tensor], tables: SpecTables, cfg: EngineConfig
) -> tuple[State, torch.Tensor, torch.Tensor]:
    """Op + tick + epoch count: everything of a step that comes before the host epoch.

    First the values "as of this decision" are kept: alpha (for the shock term) and the measured
    gradient health, which the next observation shows as the previous health (the original
    stores it after each decision; a slot never measured keeps -1).
    """
    slots = dict(state["slots"])
    slots["previous_alpha"] = slots["alpha"]
    slots["previous_gradient_health"] = torch.where(
        slots["gradient_measured"] != 0, slots["gradient_health"], slots["previous_gradient_health"]
    )
    state = {**state, "slots": slots}
    state, op, success = apply_op(state, action, tables, cfg)
    state = tick(state, cfg)
    state["epoch"] = state["epoch"] + 1
    state["slots"] = slot_major(state["slots"])
    return state, op, success


def emit(state: State, tables: SpecTables, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """Observation, blueprint indices and masks for the next decision; ``masks`` is
    ``{"head": [E, 8, K], "slot_by_op": [E, 6, S]}`` as uint8 0/1 flags (``masks.mask_flags``),
    which the engine turns into bool views after the graph. Also the
    real objective of the state reached (``committed_gain`` J in pp, ``acc_committed``), for
    evaluation: policies do not read them."""
    obs, blueprint_index = observe(state, tables, cfg)
    return {
        "observation": obs,
        "blueprint_index": blueprint_index,
        "committed_gain": committed_gain(state),
        "acc_committed": state["acc_committed"],
        "masks": mask_flags(state, tables, cfg),
    }


def transition(
    state: State,
    action: dict[str, torch.Tensor],
    metrics: dict[str, torch.Tensor],
    tables: SpecTables,
    cfg: EngineConfig,
) -> tuple[State, dict[str, torch.Tensor]]:
    """Ops, tick, record-epoch, masks and observation, with the metrics supplied by the caller."""
    state, op, success = act(state, action, tables, cfg)
    state = record_epoch(state, metrics)
    return state, {"executed_op": op, "success": success, **emit(state, tables, cfg)}
