"""Reward (SPEC §12) from the pre-action state and the executed action, as tensor functions.

``reward_terms`` returns every SHAPED term separately (so tests and logs can see which term
paid what); ``compute_reward`` picks the configured mode. All terms are evaluated for every env
and selected with ``torch.where``; see ``docs/SEMANTICS.md`` ("Reward") for the exact reading.
"""

from __future__ import annotations

import torch

from esper_soa.config import EngineConfig
from esper_soa.lifecycle import stage_in
from esper_soa.spec import GAMMA, LIVE_STAGES, MIN_PRUNE_AGE, N_STAGE_CODES, OPS, PRUNABLE_STAGES, Op, Stage
from esper_soa.state import State

# Potential base per stage code (SPEC §12); stages not listed are 0.
PHI_BASE = {Stage.GERMINATED: 1.0, Stage.TRAINING: 2.0, Stage.BLENDING: 3.5, Stage.HOLDING: 5.5, Stage.FOSSILIZED: 6.0}
PBRS_WEIGHT = 0.3
RENT_HOST_SHARE = 0.0039
SHOCK_COEF = 0.1958
SHAPED_TERMS = (
    "attribution",
    "ratio_penalty",
    "blending_warning",
    "holding_warning",
    "pbrs",
    "synergy",
    "rent",
    "alpha_shock",
    "capacity",
    "op_shaping",
    "terminal",
)


def tau(g: torch.Tensor) -> torch.Tensor:
    """Timing discount for seeds germinated in the first 10 epochs."""
    g = g.to(torch.float32)
    return torch.where(g >= 10, torch.ones_like(g), 0.4 + 0.06 * g)


def potential(stage: torch.Tensor, epochs: torch.Tensor) -> torch.Tensor:
    base = torch.tensor([PHI_BASE.get(code, 0.0) for code in range(N_STAGE_CODES)], device=stage.device)
    return base[stage] + (0.3 * epochs.to(torch.float32)).clamp(max=2.0)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def reward_terms(
    state: State, action: dict[str, torch.Tensor], op: torch.Tensor, cfg: EngineConfig
) -> dict[str, torch.Tensor]:
    """Every SHAPED term, ``[E]`` float32 each. ``op`` is the executed op (invalid -> WAIT)."""
    sl = state["slots"]
    n_slots = sl["stage"].shape[1]
    f = torch.float32
    slot = action["slot"]
    in_range = (slot >= 0) & (slot < n_slots)
    idx = slot.clamp(0, n_slots - 1)[:, None]
    t = {k: v.gather(1, idx).squeeze(1) for k, v in sl.items()}
    stage = t["stage"]
    has_target = in_range & stage_in(stage, PRUNABLE_STAGES)
    acc = state["val_acc"]
    h = state["host_params"]
    imp = acc - state["acc_all_seeds_off"]  # I
    c_known = (t["contribution_measured"] != 0) & (t["epochs_since_measurement"] == 0)
    c = t["contribution"]
    p = acc - t["germination_val_acc"]
    e = t["epochs_in_stage"].to(f)
    age = t["seed_age"].to(f)
    is_op = {o: op == int(o) for o in OPS}

    # (a) bounded attribution + ratio penalty
    harmonic = 2 * p * c / torch.where((p + c) > 0, p + c, torch.ones_like(c))
    positive = torch.where(p <= 0, _zero(c), torch.where(c >= p, harmonic, c))
    d = torch.where(imp < 0, torch.sigmoid(3 * imp), torch.ones_like(imp))
    measured = torch.where(c < 0, c, positive) * d * tau(t["germination_epoch"])
    proxy = torch.where(
        stage_in(stage, (Stage.BLENDING, Stage.HOLDING)), 0.3 * (acc - t["accuracy_at_stage_start"]), _zero(acc)
    )
    attribution = torch.where(c_known, measured, proxy)
    attribution = torch.where(is_op[Op.FOSSILIZE] & (imp < 0), _zero(attribution), attribution)
    attribution = torch.where(is_op[Op.PRUNE], -attribution, attribution)
    attribution = torch.where(has_target, attribution, _zero(attribution))
    safe_imp = torch.where(imp > 0.1, imp, torch.ones_like(imp))
    ratio = c / safe_imp
    ratio_penalty = torch.where(
        imp > 0.1,
        torch.where(ratio > 5, -(0.1 * (ratio - 5) / 5).clamp(max=0.3), _zero(c)),
        -0.3 * (c / 10).clamp(max=1.0),
    )
    ratio_penalty = torch.where(has_target & c_known & (c > 1) & (d >= 0.5), ratio_penalty, _zero(c))

    # (b), (c) stage warnings
    blending_warning = torch.where(
        has_target & (stage == int(Stage.BLENDING)) & (imp < 0), -0.1 - (0.05 * e).clamp(max=0.3), _zero(e)
    )
    holding_warning = torch.where(
        has_target
        & (stage == int(Stage.HOLDING))
        & ~is_op[Op.FOSSILIZE]
        & ~is_op[Op.PRUNE]
        & (e >= 2)
        & (attribution > 0),
        -(0.1 + 0.05 * (e - 2).clamp(min=0)).clamp(max=0.3),
        _zero(e),
    )

    # (d) PBRS, telescoping over the target slot's stage clock
    phi = potential(stage, t["epochs_in_stage"])
    phi_prev = torch.where(
        t["epochs_in_stage"] == 0,
        potential(t["previous_stage"], t["previous_epochs_in_stage"]),
        potential(stage, t["epochs_in_stage"] - 1),
    )
    pbrs = torch.where(
        in_range & stage_in(stage, LIVE_STAGES), PBRS_WEIGHT * (GAMMA * phi - phi_prev), _zero(phi)
    )

    # (e) synergy
    synergy = torch.where(has_target & (attribution > 0), 0.1 * torch.tanh(0.5 * t["interaction_sum"]), _zero(e))

    # (f) rent, (g) alpha shock, (h) capacity: env-wide
    all_stage = sl["stage"]
    h_floor = h.clamp(min=200.0)
    rented = stage_in(all_stage, (Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)).to(f)
    eff = (rented * (RENT_HOST_SHARE * h[:, None] + sl["alpha"] * sl["seed_params"])).sum(1)
    rent = -(0.5 * torch.log1p(eff / h_floor)).clamp(max=1.5)
    jump = ((sl["alpha"] - sl["previous_alpha"]) ** 2 * sl["seed_params"]).sum(1)
    alpha_shock = -(SHOCK_COEF * jump / h_floor).clamp(max=1.0)
    n_active = stage_in(all_stage, PRUNABLE_STAGES).sum(1).to(f)
    n_fossil = (all_stage == int(Stage.FOSSILIZED)).sum(1).to(f)
    capacity = -0.01 * (n_active + n_fossil - 1).clamp(min=0) - 0.002 * n_fossil

    # (i) op shaping
    ramp = (e / 5).clamp(max=1.0)
    fossilize = torch.where(
        imp >= 0,
        torch.where(c_known & (c >= 1), (0.5 + 0.1 * c) * ramp + 0.9645 * ramp, torch.full_like(c, -0.2)),
        -0.5 - (0.2 * imp.abs()).clamp(max=1.0),
    ) - 0.01
    young = torch.where(age < MIN_PRUNE_AGE, -0.3 * (MIN_PRUNE_AGE - age), _zero(age))
    by_contribution = torch.where(
        c < -0.5,
        torch.where(age < 3, torch.full_like(c, -0.1), torch.full_like(c, 0.15)),
        torch.where(c < 0, torch.full_like(c, 0.1), (-0.3 - 0.05 * c).clamp(min=-0.9)),
    )
    prune = -PBRS_WEIGHT * phi + young + torch.where(c_known, by_contribution, _zero(c)) - 0.005
    germinate = 0.3 * GAMMA * tau(state["epoch"]) - 0.15
    op_shaping = (
        torch.where(is_op[Op.GERMINATE], germinate, _zero(e))
        + torch.where(is_op[Op.FOSSILIZE], fossilize, _zero(e))
        + torch.where(is_op[Op.PRUNE], prune, _zero(e))
        + torch.where(is_op[Op.SET_ALPHA_TARGET], torch.full_like(e, -0.005), _zero(e))
        + torch.where(is_op[Op.ADVANCE] & (stage == int(Stage.TRAINING)), torch.full_like(e, -0.1), _zero(e))
    )

    # (j) terminal
    last = state["epoch"] == cfg.max_epochs - 1
    unfinished = stage_in(all_stage, (Stage.GERMINATED, Stage.TRAINING))
    stranded = (unfinished.to(f) * 0.3 * GAMMA / GAMMA ** sl["seed_age"].to(f)).sum(1)
    terminal = torch.where(last, 0.05 * acc - stranded, _zero(acc))

    return {
        "attribution": attribution,
        "ratio_penalty": ratio_penalty,
        "blending_warning": blending_warning,
        "holding_warning": holding_warning,
        "pbrs": pbrs,
        "synergy": synergy,
        "rent": rent,
        "alpha_shock": alpha_shock,
        "capacity": capacity,
        "op_shaping": op_shaping,
        "terminal": terminal,
    }


def sparse_reward(state: State) -> torch.Tensor:
    """End-of-episode accuracy minus a fossil-parameter cost, 0 before the last step."""
    sl = state["slots"]
    fossil = (sl["stage"] == int(Stage.FOSSILIZED)).to(torch.float32)
    fossil_params = (fossil * sl["seed_params"]).sum(1)
    return (state["val_acc"] / 100 - 0.1 * fossil_params / 5e5).clamp(-1.0, 1.0)


def compute_reward(
    state: State, action: dict[str, torch.Tensor], op: torch.Tensor, cfg: EngineConfig
) -> torch.Tensor:
    """[E] float32 reward of (pre-action state, executed action) in ``cfg.reward_mode``."""
    mode = cfg.reward_mode
    if mode == "shaped":
        return torch.stack(list(reward_terms(state, action, op, cfg).values())).sum(0)
    last = state["epoch"] == cfg.max_epochs - 1
    zero = torch.zeros_like(state["val_acc"])
    if mode in ("sparse", "minimal"):
        reward = torch.where(last, sparse_reward(state), zero)
        if mode == "minimal":
            sl = state["slots"]
            n_slots = sl["stage"].shape[1]
            age = sl["seed_age"].gather(1, action["slot"].clamp(0, n_slots - 1)[:, None]).squeeze(1)
            reward = reward - 0.1 * ((op == int(Op.PRUNE)) & (age < MIN_PRUNE_AGE)).to(torch.float32)
        return reward
    # simplified
    sl = state["slots"]
    pbrs = reward_terms(state, action, op, cfg)["pbrs"]
    contributing = (
        (sl["stage"] == int(Stage.FOSSILIZED)) & (sl["contribution_measured"] != 0) & (sl["contribution"] > 0)
    ).sum(1)
    end = 3 * state["val_acc"] / 100 + 2 * contributing.to(torch.float32)
    return pbrs - 0.01 * (op != int(Op.WAIT)).to(torch.float32) + torch.where(last, end, zero)
