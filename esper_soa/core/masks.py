"""Action masks (SPEC §9), computed from the state in the same compiled graph as the step.

``slot_by_op`` is the primary mask: per (env, op, slot) validity of §5. Everything else is
derived from it, so the op mask, the hierarchical slot mask and the executed-op check can
never disagree.
"""

from __future__ import annotations

import functools

import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.lifecycle import germinate_allowed, op_rules
from esper_soa.core.spec import (
    ALPHA_SPEED_TICKS,
    ALPHA_TARGET_DEFAULT,
    ALPHA_TARGETS,
    FIXED_HEAD_SIZES,
    STYLE_DEFAULT,
    TEMPO_EPOCHS,
    Op,
    SpecTables,
)
from esper_soa.core.state import State


def mask_flags(state: State, tables: SpecTables, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """All action masks as uint8 0/1 ``[E, n]`` tensors plus ``slot_by_op`` ``[E, 6, S]``: the form
    the compiled step emits (the engine hands them out as bool views, see :func:`as_bool`).

    Why uint8: inductor's CPU code stores a bool buffer through a generic element-by-element
    helper, about 10x slower than a uint8 store; a bool *view* of uint8 costs nothing, but only
    outside the compiled graph (inside it, the view is a bitcasting copy).
    """
    sl = state["slots"]
    stage = sl["stage"]
    n_envs = stage.shape[0]
    enabled = tables.slot_enabled[None, :].expand_as(stage)
    env_ok = germinate_allowed(stage, tables, cfg)[:, None]
    # built head-major ([6, S, E], [n, E]) and returned as [E, ...] views: every write is then a
    # full-width vector over envs (see state.py on the slot-major layout)
    rows = [r.T for r in op_rules(stage, sl["alpha_mode"], sl["seed_age"], enabled, env_ok, cfg)]
    on_any_slot = [functools.reduce(torch.logical_or, r.unbind(0)) for r in rows]  # [E] per op

    def flags(mask: torch.Tensor) -> torch.Tensor:  # where(.., 1, 0): inductor's fast uint8 path
        return torch.where(mask, 1, 0).to(torch.uint8)

    def constant(valid: torch.Tensor) -> torch.Tensor:  # a broadcast view of one [n] row
        return flags(valid)[None, :].expand(n_envs, -1)

    def all_or_default(flag: torch.Tensor, n: int, default: int) -> torch.Tensor:
        idx = torch.arange(n, device=stage.device)[:, None]
        return flags(flag[None, :] | (idx == default)).T

    styled = on_any_slot[int(Op.GERMINATE)] | on_any_slot[int(Op.SET_ALPHA_TARGET)]
    return {  # stacks of flags, never of bools: a stack is a materialized buffer
        "op": torch.stack([flags(m) for m in on_any_slot]).T,
        "slot_by_op": torch.stack([flags(r) for r in rows]).permute(2, 0, 1),
        "blueprint": constant(tables.blueprint_valid),
        "style": all_or_default(styled, FIXED_HEAD_SIZES["style"], int(STYLE_DEFAULT)),
        "tempo": constant(tables.all_true[: len(TEMPO_EPOCHS)]),
        "alpha_target": all_or_default(styled, len(ALPHA_TARGETS), ALPHA_TARGET_DEFAULT),
        "alpha_speed": constant(tables.all_true[: len(ALPHA_SPEED_TICKS)]),
        "alpha_curve": constant(tables.all_true[: FIXED_HEAD_SIZES["alpha_curve"]]),
    }


def as_bool(flags: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-copy bool views of uint8 0/1 masks (call it outside compiled graphs)."""
    return {k: v.view(torch.bool) for k, v in flags.items()}


def compute_masks(state: State, tables: SpecTables, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """All action masks as bool ``[E, n]`` tensors plus ``slot_by_op`` ``[E, 6, S]``."""
    return as_bool(mask_flags(state, tables, cfg))


def _sample(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform draw among the allowed entries of each row (Gumbel-max: no host sync)."""
    u = torch.rand(mask.shape, generator=generator, device=mask.device).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(u))
    return torch.where(mask, gumbel, torch.full_like(gumbel, -float("inf"))).argmax(-1)


def sample_masked_action(
    masks: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A uniformly random valid action per env (any batch shape ``[...]``): op first, then a slot
    the op allows, then the other heads from their masks (SPEC §9 hierarchical sampling)."""
    op = _sample(masks["op"], generator)
    n_slots = masks["slot_by_op"].shape[-1]
    slot_mask = masks["slot_by_op"].gather(-2, op[..., None, None].expand(*op.shape, 1, n_slots)).squeeze(-2)
    action = {"op": op, "slot": _sample(slot_mask, generator)}
    for name in ("blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve"):
        action[name] = _sample(masks[name], generator)
    return action
