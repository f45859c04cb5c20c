"""Seed lifecycle transitions (SPEC §5, §6, §8) and record-epoch, branch-free over envs and slots.

Every function takes the nested state dict (see ``state.py``) and returns a new one; work is
expressed as per-slot selection masks and ``torch.where`` writes, so one compiled graph serves
every env and slot whatever their stages. Decisions the SPEC leaves open are in
``docs/SEMANTICS.md``.
"""

from __future__ import annotations

import torch

from esper_soa.core.alpha import finish_blend, hold_at, retarget, tick_alpha
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import (
    ADVANCEABLE_STAGES,
    ALPHA_ATOL,
    COUNTERFACTUAL_STAGES,
    EMBARGO_EPOCHS,
    G2_MIN_EPOCHS,
    G2_MIN_HEALTH,
    G2_STRICT_GRAD_RATIO,
    G2_STRICT_IMPROVEMENT,
    G3_STRICT_MIN_EPOCHS,
    G5_STRICT_CONTRIBUTION,
    GERMINATE_BLOCKING_STAGES,
    GRADIENT_STAGES,
    HEAD_NAMES,
    LIVE_STAGES,
    METRIC_FIELDS,
    MIN_PRUNE_AGE,
    PRUNABLE_STAGES,
    RESETTING_EPOCHS,
    AlphaMode,
    Op,
    SpecTables,
    Stage,
    head_sizes,
    stage_in,
)
from esper_soa.core.state import (
    State,
    neutral_slots_like,
    slot_major,
    update,
    where_slots,
)


def copy_state(state: State) -> tuple[State, State]:
    """Shallow copies of the env dict and its slot dict, so updates never touch the input."""
    st = dict(state)
    st["slots"] = dict(state["slots"])
    return st, st["slots"]


def move(slots: State, sel: torch.Tensor, stage: Stage, val_acc: torch.Tensor) -> None:
    """Stage transition where ``sel``: keep the previous stage, restart the stage clock."""
    update(
        slots,
        sel,
        previous_stage=slots["stage"],
        previous_epochs_in_stage=slots["epochs_in_stage"],
        epochs_in_stage=0,
        accuracy_at_stage_start=val_acc[:, None].expand_as(slots["alpha"]),
        stage=int(stage),
    )


# --- gates (SPEC §8) ---------------------------------------------------------------------------
def gate_g2(st: State, cfg: EngineConfig) -> torch.Tensor:
    """TRAINING -> BLENDING. Strict mode *replaces* the permissive safety checks (measured, not
    exploding, healthy) with improvement and gradient-ratio checks, as the original's
    ``QualityGates._check_g2`` does; both need ``G2_MIN_EPOCHS`` in stage."""
    sl = st["slots"]
    trained = sl["epochs_in_stage"] >= G2_MIN_EPOCHS
    if cfg.strict_gates:
        improvement = st["val_acc"][:, None] - sl["accuracy_at_stage_start"]
        return trained & (improvement >= G2_STRICT_IMPROVEMENT) & (sl["gradient_ratio"] >= G2_STRICT_GRAD_RATIO)
    return (
        trained
        & (sl["gradient_measured"] != 0)
        & (sl["has_exploding"] == 0)
        & (sl["gradient_health"] >= G2_MIN_HEALTH)
    )


def gate_g3(st: State, cfg: EngineConfig) -> torch.Tensor:
    sl = st["slots"]
    ok = (
        (sl["alpha_target"] >= 1.0 - ALPHA_ATOL)
        & ((sl["alpha"] - sl["alpha_target"]).abs() <= ALPHA_ATOL)
        & (sl["alpha_mode"] == int(AlphaMode.HOLD))
    )
    if cfg.strict_gates:
        ok = ok & (sl["epochs_in_stage"] >= G3_STRICT_MIN_EPOCHS)
    return ok


def gate_g5(st: State, cfg: EngineConfig) -> torch.Tensor:
    sl = st["slots"]
    ok = sl["contribution_measured"] != 0
    if cfg.strict_gates:
        ok = ok & (sl["contribution"] >= G5_STRICT_CONTRIBUTION)
    return ok


def advance(st: State, sel: torch.Tensor, cfg: EngineConfig) -> torch.Tensor:
    """ADVANCE effect where ``sel`` (G1/G2/G3 by stage); returns the slots that moved."""
    sl = st["slots"]
    stage = sl["stage"]
    g1 = sel & (stage == int(Stage.GERMINATED))
    g2 = sel & (stage == int(Stage.TRAINING)) & gate_g2(st, cfg)
    g3 = sel & (stage == int(Stage.BLENDING)) & gate_g3(st, cfg)
    move(sl, g1, Stage.TRAINING, st["val_acc"])
    move(sl, g2, Stage.BLENDING, st["val_acc"])
    retarget(
        sl,
        g2,
        sl["germination_alpha_target"],
        sl["tempo"],
        sl["alpha_curve"],
        sl["alpha_steepness"],
    )
    move(sl, g3, Stage.HOLDING, st["val_acc"])
    finish_blend(sl, g3)
    return g1 | g2 | g3


# --- actions (SPEC §5) -------------------------------------------------------------------------
def action_in_range(action: dict[str, torch.Tensor], n_slots: int) -> torch.Tensor:
    """[E] bool: every head index is within its range (out-of-range executes as WAIT)."""
    sizes = head_sizes(n_slots)
    ok = torch.ones_like(action["op"], dtype=torch.bool)
    for name in HEAD_NAMES:
        ok = ok & (action[name] >= 0) & (action[name] < sizes[name])
    return ok


def germinate_allowed(stage: torch.Tensor, tables: SpecTables, cfg: EngineConfig) -> torch.Tensor:
    """[E] bool: no enabled slot blocks germination and the seed budget is not spent (SPEC §9)."""
    enabled = tables.slot_enabled[None, :].expand_as(stage)
    ok = ~(stage_in(stage, GERMINATE_BLOCKING_STAGES) & enabled).any(1)
    if cfg.max_seeds > 0:
        has_seed = (stage != int(Stage.DORMANT)) & (stage != int(Stage.UNKNOWN))
        ok = ok & (has_seed.sum(1) < cfg.max_seeds)
    return ok


def op_rules(
    stage: torch.Tensor,
    alpha_mode: torch.Tensor,
    seed_age: torch.Tensor,
    enabled: torch.Tensor,
    env_ok: torch.Tensor,
    cfg: EngineConfig,
) -> tuple[torch.Tensor, ...]:
    """Validity of each op (in ``Op`` order) on a slot, SPEC §5/§9, for any broadcastable shapes.

    The one statement of the rules: the masks evaluate it on every slot, ``apply_op`` on each
    env's chosen slot only (so an executed op is valid exactly when the mask allowed it).
    ``env_ok`` is :func:`germinate_allowed` broadcast to the slot shape.
    """
    holding_mode = alpha_mode == int(AlphaMode.HOLD)
    advance = enabled & stage_in(stage, ADVANCEABLE_STAGES)
    return (
        enabled,  # WAIT
        enabled & (stage == int(Stage.DORMANT)) & env_ok,  # GERMINATE
        enabled & stage_in(stage, (Stage.BLENDING, Stage.HOLDING)) & holding_mode,  # SET_ALPHA_TARGET
        enabled & stage_in(stage, PRUNABLE_STAGES) & (seed_age >= MIN_PRUNE_AGE) & holding_mode,  # PRUNE
        enabled & (stage == int(Stage.HOLDING)),  # FOSSILIZE
        torch.zeros_like(advance) if cfg.all_auto_forward else advance,  # ADVANCE
    )


def apply_op(
    state: State,
    action: dict[str, torch.Tensor],
    tables: SpecTables,
    cfg: EngineConfig,
) -> tuple[State, torch.Tensor, torch.Tensor]:
    """Execute each env's op on its target slot.

    Validity is :func:`op_rules` on the chosen slot of the pre-action state, i.e. the action masks'
    verdict without building the ``[E, 6, S]`` mask. Returns (state, executed op [E] int64,
    success [E] float32); invalid or out-of-range actions execute WAIT with success 0.
    """
    st, sl = copy_state(state)
    n_slots = sl["stage"].shape[1]
    sizes = head_sizes(n_slots)
    h = {k: action[k].clamp(0, sizes[k] - 1) for k in HEAD_NAMES}
    slot_col = h["slot"][:, None]

    def chosen(v: torch.Tensor) -> torch.Tensor:  # [E, S] -> [E]: the value on the chosen slot
        return v.gather(1, slot_col).squeeze(1)

    rules = op_rules(
        chosen(sl["stage"]), chosen(sl["alpha_mode"]), chosen(sl["seed_age"]),
        tables.slot_enabled[h["slot"]], germinate_allowed(sl["stage"], tables, cfg), cfg,
    )
    valid = rules[0] & (h["op"] == 0)
    for code, rule in enumerate(rules[1:], start=1):
        valid = valid | (rule & (h["op"] == code))
    valid = valid & action_in_range(action, n_slots)
    valid = valid & ((h["op"] != int(Op.GERMINATE)) | tables.blueprint_valid[h["blueprint"]])
    op = torch.where(valid, h["op"], torch.zeros_like(h["op"]))
    # built [S, E] and viewed [E, S]: the slot-major layout of the state (see state.py)
    target = ((torch.arange(n_slots, device=op.device)[:, None] == h["slot"][None, :]) & valid[None, :]).T
    col = {k: v[:, None] for k, v in h.items()}  # [E, 1] views that broadcast over slots
    val_acc = st["val_acc"]

    def on(o: Op) -> torch.Tensor:
        return target & (op == int(o))[:, None]

    # GERMINATE
    sel = on(Op.GERMINATE)
    curve = tables.style_curve[col["style"]]
    move(sl, sel, Stage.GERMINATED, val_acc)
    update(
        sl,
        sel,
        blueprint=col["blueprint"],
        algorithm=tables.style_algorithm[col["style"]],
        tempo=tables.tempo_epochs[col["tempo"]],
        germination_alpha_target=tables.alpha_targets[col["alpha_target"]],
        seed_age=0,
        germination_epoch=st["epoch"][:, None],
        germination_val_acc=val_acc[:, None],
        seed_params=tables.blueprint_params[:, h["blueprint"]].T,
        pending_prune=False,
    )
    hold_at(sl, sel, 0.0)
    update(sl, sel, alpha_curve=curve, alpha_steepness=tables.curve_steepness[curve])

    # SET_ALPHA_TARGET
    sel = on(Op.SET_ALPHA_TARGET)
    target_alpha = tables.alpha_targets[col["alpha_target"]]
    speed = tables.alpha_speed_ticks[col["alpha_speed"]]
    steepness = tables.curve_steepness[col["alpha_curve"]]
    move(sl, sel & (sl["stage"] == int(Stage.HOLDING)) & (target_alpha < 1.0), Stage.BLENDING, val_acc)
    update(sl, sel, algorithm=tables.style_algorithm[col["style"]])
    retarget(sl, sel, target_alpha, speed, col["alpha_curve"], steepness)

    # PRUNE
    sel = on(Op.PRUNE)
    instant = sel & ((speed <= 0) | (sl["alpha"] <= 0))
    move(sl, instant, Stage.PRUNED, val_acc)
    hold_at(sl, instant, 0.0)
    update(sl, instant, pending_prune=False)
    ramp = sel & ~instant
    move(sl, ramp & (sl["stage"] == int(Stage.HOLDING)), Stage.BLENDING, val_acc)
    retarget(sl, ramp, torch.zeros_like(sl["alpha"]), speed, col["alpha_curve"], steepness)
    update(sl, ramp, pending_prune=True)

    # FOSSILIZE
    sel = on(Op.FOSSILIZE)
    fossilized = sel & gate_g5(st, cfg)
    move(sl, fossilized, Stage.FOSSILIZED, val_acc)  # the controller stays as HOLDING left it
    st["n_fossilized"] = st["n_fossilized"] + fossilized.sum(1)

    # ADVANCE
    advanced = advance(st, on(Op.ADVANCE), cfg)

    gate_failed = ((op == int(Op.FOSSILIZE)) & ~fossilized.any(1)) | ((op == int(Op.ADVANCE)) & ~advanced.any(1))
    success = (valid & ~gate_failed).to(torch.float32)
    st["last_op"] = op
    st["last_action_success"] = success
    return st, op, success


# --- per-epoch tick (SPEC §6) ------------------------------------------------------------------
def tick(state: State, cfg: EngineConfig) -> State:
    """One epoch of every slot after the op, in the original's order: first its
    ``SeedSlot.step_epoch`` (cooldown moves, auto-advance, the alpha tick), then the epoch count
    that its ``record_accuracy`` makes, so a slot moved here is observed with 1 epoch in stage."""
    st, sl = copy_state(state)
    val_acc = st["val_acc"]
    stage = sl["stage"]
    pruned = stage == int(Stage.PRUNED)
    blending = stage == int(Stage.BLENDING)  # before auto G2: a seed it moves does no alpha tick
    move(sl, pruned, Stage.EMBARGOED, val_acc)

    early = tuple(s for s, on in ((Stage.GERMINATED, cfg.auto_forward_g1), (Stage.TRAINING, cfg.auto_forward_g2)) if on)
    if early:  # static config, not data-dependent
        advance(st, stage_in(stage, early), cfg)

    tick_alpha(sl, blending)
    prune_done = blending & (sl["pending_prune"] != 0) & (sl["alpha_mode"] == int(AlphaMode.HOLD))
    move(sl, prune_done, Stage.PRUNED, val_acc)
    hold_at(sl, prune_done, 0.0)
    update(sl, prune_done, pending_prune=False)
    if cfg.auto_forward_g3:  # G3 right after the tick, so HOLDING starts when the ramp ends
        advance(st, blending & ~prune_done, cfg)

    counted = (stage_in(sl["stage"], LIVE_STAGES + (Stage.EMBARGOED, Stage.RESETTING)) & ~pruned) | prune_done
    sl["epochs_in_stage"] = sl["epochs_in_stage"] + counted.to(sl["epochs_in_stage"].dtype)
    sl["seed_age"] = sl["seed_age"] + counted.to(sl["seed_age"].dtype)
    stage = sl["stage"]
    embargo_over = counted & (stage == int(Stage.EMBARGOED)) & (sl["epochs_in_stage"] >= EMBARGO_EPOCHS)
    reset_over = counted & (stage == int(Stage.RESETTING)) & (sl["epochs_in_stage"] >= RESETTING_EPOCHS)
    move(sl, embargo_over, Stage.RESETTING, val_acc)
    st["slots"] = where_slots(reset_over, neutral_slots_like(sl), sl)
    return st


PER_SLOT_METRICS = tuple(k for k, (_, per_slot) in METRIC_FIELDS.items() if per_slot)


# --- record-epoch (SPEC §4 step 5) -------------------------------------------------------------
def _slot_major_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-slot metrics copied once into one slot-major float block ``[k, S, E]``.

    Whatever layout the caller's ``[E, S]`` metrics have, the reads below are then in the slot
    fields' layout. A concatenation is always a materialized buffer in inductor's CPU backend; a
    plain ``.contiguous()`` gets fused into the consumers instead, and a loop that mixes
    env-major and slot-major reads is tiled 16 x 16, which with S < 16 leaves only its scalar tail.
    """
    block = torch.stack([metrics[k].T.to(torch.float32) for k in PER_SLOT_METRICS])
    return {
        k: (row.T != 0) if metrics[k].dtype == torch.bool else row.T
        for k, row in zip(PER_SLOT_METRICS, block.unbind(0))
    }


def record_epoch(state: State, metrics: dict[str, torch.Tensor]) -> State:
    """Write one epoch of dynamics metrics into the state (histories, counterfactuals, grads)."""
    st, sl = copy_state(state)
    metrics = {**metrics, **_slot_major_metrics(metrics)}
    val_acc = metrics["val_acc"]
    for name in ("val_loss", "val_acc", "acc_all_seeds_off", "acc_committed", "host_params"):
        st[name] = metrics[name].to(st[name].dtype)
    st["loss_history"] = torch.cat([st["loss_history"][:, 1:], metrics["val_loss"][:, None]], dim=1)
    st["acc_history"] = torch.cat([st["acc_history"][:, 1:], val_acc[:, None]], dim=1)
    st["history_len"] = (st["history_len"] + 1).clamp(max=st["loss_history"].shape[1])

    # a seed's first recorded epoch sets its baselines (the original's record_accuracy with
    # epochs_total == 0), after any auto G1 of this tick
    first = stage_in(sl["stage"], LIVE_STAGES) & (sl["seed_age"] == 1)
    update(sl, first, accuracy_at_germination=val_acc[:, None], accuracy_at_stage_start=val_acc[:, None])

    live = stage_in(sl["stage"], LIVE_STAGES)
    measured = stage_in(sl["stage"], COUNTERFACTUAL_STAGES) & (sl["alpha"] > 0)
    was_measured = sl["contribution_measured"] != 0
    new_c = val_acc[:, None] - metrics["acc_without_slot"]
    update(
        sl,
        ~measured & was_measured,
        epochs_since_measurement=sl["epochs_since_measurement"] + 1,
    )
    # the original zeroes every live seed's interaction_sum before its ablations, which then
    # refill it for the measured seeds only (a FOSSILIZED seed reads 0)
    update(sl, live, interaction_sum=torch.where(measured, metrics["interaction_sum"], 0.0))
    update(
        sl,
        measured,
        contribution_velocity=torch.where(was_measured, new_c - sl["contribution"], torch.zeros_like(new_c)),
        previous_contribution=sl["contribution"],
        contribution=new_c,
        contribution_measured=True,
        epochs_since_measurement=0,
    )

    graded = stage_in(sl["stage"], GRADIENT_STAGES)
    measured_ratio = metrics["gradient_ratio"]
    update(
        sl,
        graded,
        gradient_norm=metrics["gradient_norm"],
        gradient_health=metrics["gradient_health"],
        # what G2 reads is the trainer's running mean of the per-epoch ratio (0.9 / 0.1, started
        # by the seed's first measurement), as the original's seed_gradient_norm_ratio
        gradient_ratio=torch.where(
            sl["gradient_measured"] != 0, 0.9 * sl["gradient_ratio"] + 0.1 * measured_ratio, measured_ratio
        ),
        has_vanishing=metrics["has_vanishing"],
        has_exploding=metrics["has_exploding"],
        gradient_measured=True,
    )
    st["slots"] = slot_major(sl)
    return st


def collapse(state: State, diverged: torch.Tensor) -> State:
    """Catastrophic divergence (SPEC §13): every non-fossilized seed of a diverged env is pruned
    (alpha held at 0, no pending prune); FOSSILIZED seeds are part of the host and stay."""
    st, sl = copy_state(state)
    sel = diverged[:, None] & stage_in(sl["stage"], PRUNABLE_STAGES)
    move(sl, sel, Stage.PRUNED, st["val_acc"])
    hold_at(sl, sel, 0.0)
    update(sl, sel, pending_prune=False)
    return st
