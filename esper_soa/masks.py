"""Action masks (SPEC §9), computed from the state in the same compiled graph as the step.

``slot_by_op`` is the primary mask: per (env, op, slot) validity of §5. Everything else is
derived from it, so the op mask, the hierarchical slot mask and the executed-op check can
never disagree.
"""

from __future__ import annotations

import torch

from esper_soa.config import EngineConfig
from esper_soa.lifecycle import germinate_allowed, op_rules
from esper_soa.spec import (
    ALPHA_TARGET_DEFAULT,
    ALPHA_TARGETS,
    FIXED_HEAD_SIZES,
    STYLE_DEFAULT,
    Op,
    SpecTables,
    TEMPO_EPOCHS,
    ALPHA_SPEED_TICKS,
)
from esper_soa.state import State


def compute_masks(state: State, tables: SpecTables, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """All action masks as ``[E, n]`` bool tensors plus ``slot_by_op`` ``[E, 6, S]``."""
    sl = state["slots"]
    stage = sl["stage"]
    n_envs = stage.shape[0]
    enabled = tables.slot_enabled[None, :].expand_as(stage)
    env_ok = germinate_allowed(stage, tables, cfg)[:, None]
    rows = op_rules(stage, sl["alpha_mode"], sl["seed_age"], enabled, env_ok, cfg)
    # Masks are built head-major ([6, S, E], [n, E]) and returned as [E, ...] views: every write
    # is then a full-width vector over envs (see state.py on the slot-major layout).
    by_op = torch.stack([r.T for r in rows])  # [6, S, E]
    op_t = by_op.any(dim=1)  # [6, E]

    def full(n: int) -> torch.Tensor:  # constant: a broadcast view, never materialized
        return tables.all_true[:n][None, :].expand(n_envs, n)

    def all_or_default(flag: torch.Tensor, n: int, default: int) -> torch.Tensor:
        idx = torch.arange(n, device=stage.device)[:, None]
        return (flag[None, :] | (idx == default)).T

    styled = op_t[int(Op.GERMINATE)] | op_t[int(Op.SET_ALPHA_TARGET)]
    return {
        "op": op_t.T,
        "slot_by_op": by_op.permute(2, 0, 1),
        "blueprint": tables.blueprint_valid[None, :].expand(n_envs, -1),
        "style": all_or_default(styled, FIXED_HEAD_SIZES["style"], int(STYLE_DEFAULT)),
        "tempo": full(len(TEMPO_EPOCHS)),
        "alpha_target": all_or_default(styled, len(ALPHA_TARGETS), ALPHA_TARGET_DEFAULT),
        "alpha_speed": full(len(ALPHA_SPEED_TICKS)),
        "alpha_curve": full(FIXED_HEAD_SIZES["alpha_curve"]),
    }


def _sample(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform draw among the allowed entries of each row (Gumbel-max: no host sync)."""
    u = torch.rand(mask.shape, generator=generator, device=mask.device).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(u))
    return torch.where(mask, gumbel, torch.full_like(gumbel, -float("inf"))).argmax(-1)


def sample_masked_action(
    masks: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A uniformly random valid action per env: op first, then a slot the op allows, then the
    other heads from their masks (SPEC §9 hierarchical sampling)."""
    op = _sample(masks["op"], generator)
    n_slots = masks["slot_by_op"].shape[-1]
    slot_mask = masks["slot_by_op"].gather(1, op[:, None, None].expand(-1, 1, n_slots)).squeeze(1)
    action = {"op": op, "slot": _sample(slot_mask, generator)}
    for name in ("blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve"):
        action[name] = _sample(masks[name], generator)
    return action
