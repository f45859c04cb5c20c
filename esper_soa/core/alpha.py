"""Alpha controller (SPEC §7) as branch-free tensor updates over ``[E, S]`` slots.

The controller only moves from HOLD (``retarget``) and advances one step per epoch tick
(``tick_alpha``); curves are evaluated for every slot and selected with ``torch.where`` so the
compiled graph has no data-dependent control flow.
"""

from __future__ import annotations

import math

import torch

from esper_soa.core.spec import AlphaCurve, AlphaMode
from esper_soa.core.state import State, update


def alpha_progress(t: torch.Tensor, curve: torch.Tensor, steepness: torch.Tensor) -> torch.Tensor:
    """p(t) for each slot's curve: LINEAR, COSINE or the normalised sigmoid with steepness k."""
    k = torch.where(steepness > 0, steepness, torch.ones_like(steepness))
    lo = torch.sigmoid(-k / 2)
    hi = torch.sigmoid(k / 2)
    sig = (torch.sigmoid(k * (t - 0.5)) - lo) / (hi - lo)
    cos = (1.0 - torch.cos(math.pi * t)) / 2.0
    return torch.where(curve == int(AlphaCurve.LINEAR), t, torch.where(curve == int(AlphaCurve.COSINE), cos, sig))


def retarget(
    slots: State,
    sel: torch.Tensor,
    target: torch.Tensor,
    steps: torch.Tensor,
    curve: torch.Tensor,
    steepness: torch.Tensor,
) -> None:
    """Start a ramp from the current alpha to ``target`` over ``steps`` ticks where ``sel``.

    ``steps == 0`` jumps at once and stays in HOLD. Arguments broadcast to ``[E, S]``.
    """
    alpha = slots["alpha"]
    target = torch.broadcast_to(target, alpha.shape)
    mode = torch.where(
        target > alpha,
        torch.full_like(slots["alpha_mode"], int(AlphaMode.UP)),
        torch.where(
            target < alpha,
            torch.full_like(slots["alpha_mode"], int(AlphaMode.DOWN)),
            torch.full_like(slots["alpha_mode"], int(AlphaMode.HOLD)),
        ),
    )
    instant = steps <= 0
    update(
        slots,
        sel,
        alpha_start=alpha,
        alpha_target=target,
        alpha_steps_done=0,
        alpha_steps_total=torch.broadcast_to(steps, alpha.shape),
        alpha_mode=torch.where(instant, torch.zeros_like(mode), mode),
        alpha=torch.where(instant, target, alpha),
        alpha_curve=torch.broadcast_to(curve, alpha.shape),
        alpha_steepness=torch.broadcast_to(steepness, alpha.shape),
    )


def hold_at(slots: State, sel: torch.Tensor, value: float) -> None:
    """Put the controller in HOLD at ``value`` with its step counters zeroed (germination, and
    every prune: the original's ``SeedSlot.prune`` zeroes them)."""
    update(
        slots,
        sel,
        alpha=value,
        alpha_start=value,
        alpha_target=value,
        alpha_mode=int(AlphaMode.HOLD),
        alpha_steps_total=0,
        alpha_steps_done=0,
    )


def finish_blend(slots: State, sel: torch.Tensor) -> None:
    """Entering HOLDING: HOLD at 1 with ``steps_done = steps_total`` (the ramp's length is kept,
    as the original's ``SeedSlot._on_blending_complete`` keeps it)."""
    update(
        slots,
        sel,
        alpha=1.0,
        alpha_start=1.0,
        alpha_target=1.0,
        alpha_mode=int(AlphaMode.HOLD),
        alpha_steps_done=slots["alpha_steps_total"],
    )


def tick_alpha(slots: State, sel: torch.Tensor) -> None:
    """One controller step for slots in ``sel`` that are ramping (mode UP/DOWN)."""
    active = sel & (slots["alpha_mode"] != int(AlphaMode.HOLD))
    done = slots["alpha_steps_done"] + 1
    total = slots["alpha_steps_total"]
    finished = done >= total
    t = done.to(torch.float32) / total.clamp(min=1).to(torch.float32)
    start, target = slots["alpha_start"], slots["alpha_target"]
    ramp = start + (target - start) * alpha_progress(t, slots["alpha_curve"], slots["alpha_steepness"])
    ramp = torch.minimum(torch.maximum(ramp, torch.minimum(start, target)), torch.maximum(start, target))
    update(
        slots,
        active,
        alpha_steps_done=done,
        alpha=torch.where(finished, target, ramp),
        alpha_mode=torch.where(finished, torch.zeros_like(done), slots["alpha_mode"]),
    )
