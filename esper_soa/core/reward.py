"""Reward (SPEC §12) from the pre-action state and the executed action, as tensor functions.

``reward_terms`` returns every SHAPED term separately (so tests and logs can see which term
paid what); ``compute_reward`` picks the configured mode. All terms are evaluated for every env
and selected with ``torch.where``; see ``docs/SEMANTICS.md`` ("Reward") for the exact reading.

COMMITTED (SPEC §12b, the default) pays two differences of the state, escrowed credit
``gamma Psi' - Psi`` and committed gain ``W (J' - J)``: ``compute_reward`` pays the ``-Psi - W J``
half from the pre-action state and :func:`settlement` the other half from the post-step state.
"""

from __future__ import annotations

import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    GAMMA,
    LIVE_STAGES,
    MIN_PRUNE_AGE,
    N_STAGE_CODES,
    OPS,
    PRUNABLE_STAGES,
    Op,
    Stage,
    stage_in,
)
from esper_soa.core.state import State

# Reward constants (SPEC §12), named once: this module and the plain-Python reference
# (esper_soa.reference.reward) both read them.
# Potential base per stage code; stages not listed are 0.
PHI_BASE = {Stage.GERMINATED: 1.0, Stage.TRAINING: 2.0, Stage.BLENDING: 3.5, Stage.HOLDING: 5.5, Stage.FOSSILIZED: 6.0}
PHI_EPOCH_RATE = 0.3  # Phi grows 0.3 per epoch in stage ...
PHI_EPOCH_CAP = 2.0  # ... up to +2
PBRS_WEIGHT = 0.3
TIMING_FULL_EPOCH = 10  # tau(g) = 1 from (1-based) epoch 10 on
RENT_HOST_SHARE = 0.0039
PARAMS_FLOOR = 200.0  # rent and shock divide by max(H, 200)
SHOCK_COEF = 0.1958
FOSSIL_BONUS = 0.9645  # FOSSILIZE op shaping: bonus per unit of the age ramp
SPARSE_PARAM_SCALE = 5e5  # SPARSE charges 0.1 per 500,000 fossil parameters
COMMIT_WEIGHT = 20.0  # W: COMMITTED pays 20 per pp of committed gain J
FOSSIL_PARAM_PRICE = 50_000.0  # J charges 1 pp per 50,000 fossilized parameters
DIVERGENCE_PENALTY = -10.0  # SPEC §13: the step on which a host diverges (terminated)
# seeds that occupy a slot for the capacity term: every seed the original still holds a state for
# except FOSSILIZED (counted apart) and PRUNED ("Tamiyo already decided their fate")
OCCUPYING_STAGES = PRUNABLE_STAGES + (Stage.EMBARGOED, Stage.RESETTING)
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
    """Timing discount for seeds germinated in the first 10 epochs (``g`` is 1-based, as the
    original's epoch counter: our pre-action ``epoch`` + 1)."""
    g = g.to(torch.float32)
    return torch.where(g >= TIMING_FULL_EPOCH, torch.ones_like(g), 0.4 + 0.06 * g)


def potential(stage: torch.Tensor, epochs: torch.Tensor) -> torch.Tensor:
    base = torch.tensor([PHI_BASE.get(code, 0.0) for code in range(N_STAGE_CODES)], device=stage.device)
    return base[stage] + (PHI_EPOCH_RATE * epochs.to(torch.float32)).clamp(max=PHI_EPOCH_CAP)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def slot_credit(state: State) -> dict[str, torch.Tensor]:
    """Per-slot ``[E, S]`` pieces of term (a)/(e), computed for every slot at once: SHAPED reads
    them at the target slot, COMMITTED's escrow sums them over the BLENDING/HOLDING slots.

    ``measured``: c < 0 -> c (no d, no tau); c >= 0 -> ``positive`` (bounded, times d and tau).
    ``ratio_penalty`` (<= 0) applies to a fresh c > 1 when d >= 0.5; ``synergy`` is the bonus a
    slot earns when its attribution (ratio penalty included) is positive.
    """
    sl = state["slots"]
    f = torch.float32
    acc = state["val_acc"][:, None]
    imp = acc - state["acc_committed"][:, None]  # I: fossils stay on
    c = sl["contribution"]
    c_known = (sl["contribution_measured"] != 0) & (sl["epochs_since_measurement"] == 0)
    p = acc - sl["germination_val_acc"]
    d = torch.where(imp < 0, torch.sigmoid(3 * imp), torch.ones_like(imp)).expand_as(c)
    g = state["epoch"][:, None] + 1 - sl["seed_age"].to(state["epoch"].dtype)  # original: epoch - epochs_total
    harmonic = 2 * p * c / torch.where((p + c) > 0, p + c, torch.ones_like(c))
    bounded = torch.where(p <= 0, _zero(c), torch.where(c >= p, harmonic, c))
    positive = bounded * d * tau(g)
    safe_imp = torch.where(imp > 0.1, imp, torch.ones_like(imp))
    ratio = c / safe_imp
    penalty = torch.where(
        imp > 0.1,
        torch.where(ratio > 5, -(0.1 * (ratio - 5) / 5).clamp(max=0.3), _zero(c)),
        -0.3 * (c / 10).clamp(max=1.0),
    )
    ratio_penalty = torch.where(c_known & (c > 1) & (d >= 0.5), penalty, _zero(c))
    inter = sl["interaction_sum"]
    synergy = torch.where(inter > 0, 0.1 * torch.tanh(0.5 * inter), _zero(inter))
    stage = sl["stage"]
    blended = stage_in(stage, (Stage.BLENDING, Stage.HOLDING))
    proxy = torch.where(blended, 0.3 * (acc - sl["accuracy_at_stage_start"]).clamp(min=0.0), _zero(c))
    return {
        "c": c, "c_known": c_known, "d": d, "measured": torch.where(c < 0, c, positive),
        "positive": positive, "ratio_penalty": ratio_penalty, "synergy": synergy, "proxy": proxy,
        "escrowed": blended & c_known, "imp": imp.squeeze(1).to(f),
    }


def escrow(state: State, parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """COMMITTED's potential Psi ``[E]``: the credit each BLENDING/HOLDING seed with a fresh c
    would earn per step under SHAPED, held in escrow instead of paid (SPEC §12b (a')); a harmful
    seed's escrow is its (negative) c, so pruning it pays |c| once and keeping it costs nothing per
    step (J alone judges what is kept)."""
    parts = slot_credit(state) if parts is None else parts
    base = parts["positive"] + parts["ratio_penalty"]
    synergy = torch.where((parts["d"] >= 0.5) & (base > 0), parts["synergy"], _zero(base))
    credit = torch.where(parts["c"] >= 0, base.clamp(min=0.0) + synergy, parts["measured"])
    credit = torch.where(parts["escrowed"], credit, _zero(base))
    return credit.sum(1)


def fossil_params(state: State) -> torch.Tensor:
    """``[E]`` parameters the FOSSILIZED seeds added (what J and SPARSE price)."""
    sl = state["slots"]
    return torch.where(sl["stage"] == int(Stage.FOSSILIZED), sl["seed_params"], 0.0).sum(-1)


def committed_gain(state: State) -> torch.Tensor:
    """J ``[E]`` in pp: committed accuracy over the host alone minus the fossils' parameter price."""
    return state["acc_committed"] - state["acc_all_seeds_off"] - fossil_params(state) / FOSSIL_PARAM_PRICE


def reward_terms(
    state: State,
    action: dict[str, torch.Tensor],
    op: torch.Tensor,
    cfg: EngineConfig,
    parts: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every SHAPED term, ``[E]`` float32 each. ``op`` is the executed op (invalid -> WAIT)."""
    sl = state["slots"]
    n_slots = sl["stage"].shape[1]
    f = torch.float32
    slot = action["slot"]
    in_range = (slot >= 0) & (slot < n_slots)
    idx = slot.clamp(0, n_slots - 1)[:, None]
    t = {k: v.gather(1, idx).squeeze(1) for k, v in sl.items()}
    parts = slot_credit(state) if parts is None else parts
    at = {k: v.gather(1, idx).squeeze(1) for k, v in parts.items() if k != "imp"}
    stage = t["stage"]
    has_target = in_range & stage_in(stage, PRUNABLE_STAGES)
    acc = state["val_acc"]
    h = state["host_params"]
    imp = parts["imp"]  # I
    c_known, c, d = at["c_known"], at["c"], at["d"]
    e = t["epochs_in_stage"].to(f)
    age = t["seed_age"].to(f)
    is_op = {o: op == int(o) for o in OPS}
    last = state["epoch"] == cfg.max_epochs - 1

    # (a) bounded attribution (negated for PRUNE) + ratio penalty (a penalty after the negation)
    attribution = torch.where(c_known, at["measured"], at["proxy"])
    attribution = torch.where(is_op[Op.FOSSILIZE] & (imp < 0), _zero(attribution), attribution)
    attribution = torch.where(is_op[Op.PRUNE], -attribution, attribution)
    attribution = torch.where(has_target, attribution, _zero(attribution))
    ratio_penalty = torch.where(has_target, at["ratio_penalty"], _zero(c))
    bounded = attribution + ratio_penalty  # the original's bounded_attribution

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
        & (bounded > 0),
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

    # (e) synergy; without a fresh c the original computes no discount d (it stays 1)
    synergy = torch.where(has_target & (~c_known | (d >= 0.5)) & (bounded > 0), at["synergy"], _zero(e))

    # (f) rent, (g) alpha shock, (h) capacity: env-wide
    all_stage = sl["stage"]
    h_floor = h.clamp(min=PARAMS_FLOOR)
    rented = stage_in(all_stage, (Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)).to(f)
    eff = (rented * (RENT_HOST_SHARE * h[:, None] + sl["alpha"] * sl["seed_params"])).sum(1)
    rent = -(0.5 * torch.log1p(eff / h_floor)).clamp(max=1.5)
    jump = ((sl["alpha"] - sl["previous_alpha"]) ** 2 * sl["seed_params"]).sum(1)
    alpha_shock = -(SHOCK_COEF * jump / h_floor).clamp(max=1.0)
    n_active = stage_in(all_stage, OCCUPYING_STAGES).sum(1).to(f)
    n_fossil = (all_stage == int(Stage.FOSSILIZED)).sum(1).to(f)
    capacity = -0.01 * (n_active + n_fossil - 1).clamp(min=0) - 0.002 * n_fossil

    # (i) op shaping
    ramp = (e / 5).clamp(max=1.0)
    ransom = torch.where(c_known & (c > 0.1) & (imp < -0.2), torch.full_like(c, -0.3), _zero(c))
    fossilize = torch.where(
        imp >= 0,
        torch.where(c_known & (c >= 1), (0.5 + 0.1 * c) * ramp + FOSSIL_BONUS * ramp, torch.full_like(c, -0.2)),
        -0.5 - (0.2 * imp.abs()).clamp(max=1.0) + ransom,
    ) - 0.01
    by_contribution = torch.where(
        c < -0.5,
        torch.where(age < 3, torch.full_like(c, -0.1), torch.full_like(c, 0.15)),
        torch.where(c < 0, torch.full_like(c, 0.1), (-0.3 - 0.05 * c).clamp(min=-0.9)),
    )
    after_age = torch.where(
        age < MIN_PRUNE_AGE,
        -0.3 * (MIN_PRUNE_AGE - age),
        torch.where(c_known, by_contribution, _zero(c)),
    )
    prune = -PBRS_WEIGHT * phi + after_age - 0.005
    germinate = torch.where(last, _zero(acc), 0.3 * GAMMA * tau(state["epoch"] + 1)) - 0.15
    op_shaping = (
        torch.where(is_op[Op.GERMINATE], germinate, _zero(e))
        + torch.where(is_op[Op.FOSSILIZE], fossilize, _zero(e))
        + torch.where(is_op[Op.PRUNE], prune, _zero(e))
        + torch.where(is_op[Op.SET_ALPHA_TARGET], torch.full_like(e, -0.005), _zero(e))
        + torch.where(is_op[Op.ADVANCE] & (stage == int(Stage.TRAINING)), torch.full_like(e, -0.1), _zero(e))
    )

    # (j) terminal
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


def committed_terms(
    state: State, action: dict[str, torch.Tensor], op: torch.Tensor, cfg: EngineConfig
) -> dict[str, torch.Tensor]:
    """COMMITTED's pre-action terms (SPEC §12b): SHAPED's, without the per-step c >= 0
    attribution, its ratio penalty and synergy (they live in the escrow), without the +.05
    val_acc terminal, plus the ``-Psi(now)`` and ``-W J(now)`` halves of the two differences whose
    other halves :func:`settlement` pays once the next state is known.

    SHAPED's per-step terms that charge for what J already judges go too, each measured to break
    the integrity gate (bench/RESULTS.md, "Reward integrity"): the attribution of a
    BLENDING/HOLDING target of either sign (escrowed), (b) the blending and (c) the holding
    warnings (the original's patches against farming, which the escrow removes) and (f) the rent
    (J prices fossil parameters once; uncommitted seeds are not in the committed network)."""
    parts = slot_credit(state)
    terms = reward_terms(state, action, op, cfg, parts)
    n_slots = state["slots"]["stage"].shape[1]
    idx = action["slot"].clamp(0, n_slots - 1)[:, None]
    escrowed = parts["escrowed"].gather(1, idx).squeeze(1)
    zero = torch.zeros_like(state["val_acc"])
    last = state["epoch"] == cfg.max_epochs - 1
    terms["attribution"] = torch.where(escrowed, zero, terms["attribution"])
    terms["ratio_penalty"] = zero
    terms["synergy"] = zero
    terms["holding_warning"] = zero
    terms["blending_warning"] = zero
    terms["rent"] = zero
    terms["terminal"] = terms["terminal"] - torch.where(last, 0.05 * state["val_acc"], zero)
    terms["escrow"] = -escrow(state, parts)
    terms["committed"] = -COMMIT_WEIGHT * committed_gain(state)
    return terms


def settlement(next_state: State, done: torch.Tensor, cfg: EngineConfig) -> torch.Tensor:
    """The part of a step's reward that needs the post-step state: in COMMITTED,
    ``gamma Psi(next)`` (0 when the episode ends) ``+ W J(next)``; 0 in every other mode."""
    if cfg.reward_mode != "committed":
        return torch.zeros_like(next_state["val_acc"])
    kept = torch.where(done, torch.zeros_like(next_state["val_acc"]), GAMMA * escrow(next_state))
    return kept + COMMIT_WEIGHT * committed_gain(next_state)


def sparse_reward(state: State) -> torch.Tensor:
    """Committed accuracy (non-fossil seeds off) minus a fossil-parameter cost (the original's
    ``compute_sparse_reward`` on ``committed_val_acc``); the caller pays it at the last step."""
    return (state["acc_committed"] / 100 - 0.1 * fossil_params(state) / SPARSE_PARAM_SCALE).clamp(-1.0, 1.0)


def compute_reward(
    state: State, action: dict[str, torch.Tensor], op: torch.Tensor, cfg: EngineConfig
) -> torch.Tensor:
    """[E] float32 reward of (pre-action state, executed action) in ``cfg.reward_mode``."""
    mode = cfg.reward_mode
    if mode == "shaped":
        return torch.stack(list(reward_terms(state, action, op, cfg).values())).sum(0)
    if mode == "committed":
        return torch.stack(list(committed_terms(state, action, op, cfg).values())).sum(0)
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
