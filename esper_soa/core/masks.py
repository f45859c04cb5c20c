"""Action masks (SPEC §9), computed from the state in the same compiled graph as the step.

One layout from the compiled step to the loss (``MASK_KEYS``):

- ``slot_by_op`` ``[E, 6, S]``: per (env, op, slot) validity of §5, the primary mask;
- ``head`` ``[E, 8, K]``: every head's validity in ``HEAD_NAMES`` order, padded with False to
  K = the largest head (the layout of the policy's logits); the slot row is the union over ops.

Both are derived from the same ``op_rules`` rows, so the op mask, the hierarchical slot mask
and the executed-op check can never disagree. Per-head ``[E, n]`` masks are zero-copy views
(:func:`head_views`). Hierarchical sampling (op first, then a slot the op allows) lives here
too, once: the policy's distribution and every random controller draw through :func:`masked_draw`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.lifecycle import germinate_allowed, op_rules
from esper_soa.core.spec import (
    HEAD_NAMES,
    Op,
    SpecTables,
    head_sizes,
)
from esper_soa.core.state import State

SLOT = HEAD_NAMES.index("slot")


def mask_flags(state: State, tables: SpecTables, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """``head`` ``[E, 8, K]`` and ``slot_by_op`` ``[E, 6, S]`` as uint8 0/1 flags: the form the
    compiled step emits (the engine hands them out as bool views, see :func:`as_bool`).

    Why uint8: inductor's CPU code stores a bool buffer through a generic element-by-element
    helper, about 10x slower than a uint8 store; a bool *view* of uint8 costs nothing, but only
    outside the compiled graph (inside it, the view is a bitcasting copy).

    Why gathered from a few source rows (``spec.head_mask_sources``) and built head-major
    (``[8K, E]``, ``[6S, E]``, returned as permuted ``[E, ...]`` views): every write is then a
    full-width vector over envs, and the build is a handful of ops, fast both compiled and eager.
    Padding per head with ``cat``, stacking bools, or one op per entry measured 1.5-8x slower
    (bench/RESULTS.md, "One mask layout"); consumers index by env, head and entry and never need
    the rows contiguous.
    """
    sl = state["slots"]
    stage = sl["stage"]
    n_envs, n_slots = stage.shape
    enabled = tables.slot_enabled[None, :].expand_as(stage)
    env_ok = germinate_allowed(stage, tables, cfg)[:, None]
    rows = [r.T for r in op_rules(stage, sl["alpha_mode"], sl["seed_age"], enabled, env_ok, cfg)]  # [S, E] per op
    on_any_slot = [functools.reduce(torch.logical_or, r.unbind(0)) for r in rows]  # [E] per op
    styled = on_any_slot[int(Op.GERMINATE)] | on_any_slot[int(Op.SET_ALPHA_TARGET)]
    false, true = torch.zeros_like(styled), torch.ones_like(styled)
    sources = [*on_any_slot, *functools.reduce(torch.logical_or, rows).unbind(0), styled, false, true]
    head = torch.stack([_flags(r) for r in sources]).index_select(0, tables.head_mask_sources)
    return {  # stacks of flags, never of bools: a stack is a materialized buffer
        "head": head.view(len(HEAD_NAMES), -1, n_envs).permute(2, 0, 1),
        "slot_by_op": torch.stack([_flags(r) for r in rows]).permute(2, 0, 1),
    }


def _flags(mask: torch.Tensor) -> torch.Tensor:
    """bool -> uint8 0/1 through ``where(.., 1, 0)``: inductor's fast uint8 path."""
    return torch.where(mask, 1, 0).to(torch.uint8)


def as_bool(flags: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-copy bool views of uint8 0/1 masks (call it outside compiled graphs)."""
    return {k: v.view(torch.bool) for k, v in flags.items()}


def compute_masks(state: State, tables: SpecTables, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """``head`` ``[E, 8, K]`` and ``slot_by_op`` ``[E, 6, S]`` as bool (eager callers)."""
    return as_bool(mask_flags(state, tables, cfg))


def head_views(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{head: [..., n_head]}`` zero-copy views of ``masks["head"]`` (the slot entry is the union
    over ops; the op-conditioned rows are ``masks["slot_by_op"]``)."""
    sizes = head_sizes(masks["slot_by_op"].shape[-1])
    head = masks["head"]
    return {name: head[..., h, : sizes[name]] for h, name in enumerate(HEAD_NAMES)}


def slot_mask_given_op(slot_by_op: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """``[..., S]``: the slots ``op`` (``[...]``) may target, the row ``slot_by_op[..., op, :]``."""
    n_slots = slot_by_op.shape[-1]
    return slot_by_op.gather(-2, op.long()[..., None, None].expand(*op.shape, 1, n_slots)).squeeze(-2)


def masks_given_op(head: torch.Tensor, slot_by_op: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """``head`` ``[..., 8, K]`` with the slot row replaced by ``slot_by_op[op]`` (padded False)."""
    n_slots = slot_by_op.shape[-1]
    slot_row = slot_mask_given_op(slot_by_op, op)[..., None, :]  # [..., 1, S]
    slot_row = torch.cat([slot_row, slot_row.new_zeros(*slot_row.shape[:-1], head.shape[-1] - n_slots)], -1)
    is_slot = torch.arange(head.shape[-2], device=op.device)[:, None] == SLOT
    return torch.where(is_slot, slot_row, head)


def masked_draw(scores: torch.Tensor, head: torch.Tensor, slot_by_op: torch.Tensor) -> torch.Tensor:
    """``[..., 8]``: the op with the best allowed score, then the best allowed entry of every other
    head given that op (the slot under ``slot_by_op[op]``). Masked entries are -inf, so they are
    never drawn, whatever the scores; with Gumbel noise added this is exact hierarchical sampling
    (SPEC §9), without a host sync."""
    neg_inf = torch.full_like(scores, -float("inf"))
    op = torch.where(head[..., 0, :], scores[..., 0, :], neg_inf[..., 0, :]).argmax(-1)
    return torch.where(masks_given_op(head, slot_by_op, op), scores, neg_inf).argmax(-1)


def gumbel_like(
    x: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard Gumbel noise of ``x``'s shape from ``uniform`` (default: ``torch.rand``), finite:
    the uniforms are clamped inside (0, 1)."""
    if uniform is None:
        uniform = torch.rand(x.shape, generator=generator, device=x.device)
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))


def sample_masked_action(
    masks: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniformly random valid action ``[..., 8]`` (heads in ``HEAD_NAMES`` order) per env, for
    any batch shape: op first, then a slot the op allows, then the other heads (SPEC §9)."""
    head = masks["head"]
    return masked_draw(gumbel_like(head, generator), head, masks["slot_by_op"])
