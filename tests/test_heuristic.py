"""The §14a heuristic controller: masks, agreement with the per-env reference, behaviour, purity.

Whole episodes on the surrogate engine are driven by the tensorized controller; at every step each
emitted action is validated against the engine's masks and compared head by head with
``RefHeuristic`` (fed the same state, exported to numpy), and the logged trajectories are checked
against the rules, computed here independently of both implementations.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from esper_soa.agents.heuristic import (
    NEVER_PRUNED,
    HeuristicConfig,
    HeuristicController,
    HeuristicTables,
    heuristic_step,
    initial_memory,
)
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import compute_masks
from esper_soa.core.spec import (
    HEAD_NAMES,
    PRUNABLE_STAGES,
    AlphaMode,
    Blueprint,
    Op,
    SpecTables,
    Stage,
)
from esper_soa.core.state import make_state
from esper_soa.core.validation import validate_action
from esper_soa.env.engine import Engine
from esper_soa.reference import RefHeuristic, ref_heuristic_actions

COMPILE_BACKEND = os.environ.get("ESPER_COMPILE_BACKEND", "aot_eager")
CNN_ROTATION = [Blueprint.CONV_LIGHT, Blueprint.CONV_HEAVY, Blueprint.ATTENTION, Blueprint.NORM, Blueprint.DEPTHWISE]
LIVE = [int(s) for s in PRUNABLE_STAGES]


def export(engine: Engine) -> dict:
    """The engine's state as numpy arrays with state.py's names (what the reference loads)."""
    st = engine.state  # the public form: bool flags
    out = {k: v.cpu().numpy().copy() for k, v in st.items() if k != "slots"}
    out["slots"] = {k: v.cpu().numpy().copy() for k, v in st["slots"].items()}
    return out


def run(
    n_envs: int,
    seed: int,
    hcfg: HeuristicConfig | None = None,
    reset_at: dict[int, list[bool]] | None = None,
    **config: object,
) -> dict:
    """One episode driven by the controller, checked against the masks and the reference each step.

    ``reset_at`` maps a step to the rows reset (engine, controller and reference together) before
    it. Returns the per-step log: states, masks and actions as numpy, and the final state.
    """
    cfg = EngineConfig(n_envs=n_envs, seed=seed, **config)
    engine = Engine(cfg)
    engine.reset()
    ctrl = HeuristicController(cfg, hcfg)
    refs = [RefHeuristic(cfg, hcfg) for _ in range(n_envs)]
    log: dict = {"state": [], "masks": [], "action": []}
    for t in range(cfg.max_epochs):
        if reset_at and t in reset_at:
            rows = torch.tensor(reset_at[t])
            engine.reset(rows)
            ctrl.reset(rows)
            for ref, r in zip(refs, reset_at[t]):
                if r:
                    ref.reset()
        state = export(engine)
        action = ctrl.act(engine.lifecycle_state, engine.masks)
        validate_action(action, engine.masks, cfg)
        for name in HEAD_NAMES:
            assert action[name].dtype == torch.int64 and action[name].shape == (n_envs,)
        expected = ref_heuristic_actions(refs, state)
        for name in HEAD_NAMES:
            np.testing.assert_array_equal(action[name].numpy(), expected[name], err_msg=f"head {name} at step {t}")
        log["state"].append(state)
        log["masks"].append({k: v.numpy().copy() for k, v in engine.masks.items()})
        log["action"].append({k: v.numpy().copy() for k, v in action.items()})
        engine.step(action)
    log["final"] = export(engine)
    return log


@functools.cache
def full_episode() -> dict:
    """Default config, 150 epochs, 16 envs: the episode the behavioural checks read."""
    return run(16, seed=7, max_epochs=150)


@functools.cache
def sticky_penalty_episode() -> dict:
    """A pruned blueprint is skipped for good (penalty >= threshold and no decay)."""
    hcfg = HeuristicConfig(blueprint_penalty_on_prune=3.0, blueprint_penalty_decay=1.0)
    return run(16, seed=3, hcfg=hcfg, max_epochs=150)


def series(log: dict, name: str, slots: bool = False) -> np.ndarray:
    """A state field over the episode: ``[T, E]`` or ``[T, E, S]``."""
    return np.stack([s["slots"][name] if slots else s[name] for s in log["state"]])


def actions(log: dict, name: str) -> np.ndarray:
    return np.stack([a[name] for a in log["action"]])


def plateau_lengths(acc: np.ndarray, eps: float) -> np.ndarray:
    """``[T, E]`` trailing count of consecutive epoch gains <= eps (float32 arithmetic)."""
    out = np.zeros(acc.shape, dtype=np.int64)
    for t in range(1, acc.shape[0]):
        flat = (acc[t] - acc[t - 1]) <= np.float32(eps)
        out[t] = np.where(flat, out[t - 1] + 1, 0)
    return out


def target_slot(stage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(any live seed [T,E], index of the lowest live slot [T,E])."""
    live = np.isin(stage, LIVE)
    return live.any(-1), live.argmax(-1)


def at(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


# --- (a) + (b): masks and the reference, over several configs ---------------------------------
@pytest.mark.parametrize(
    "n_envs, seed, hcfg, reset_at, config",
    [
        (6, 11, None, {40: [True, False, False, True, False, False]},
         dict(topology="transformer", n_slots=2, max_epochs=90)),
        (5, 12, HeuristicConfig(prune_undecided_holding=False), None,
         dict(n_slots=4, gate_mode="strict", max_seeds=2, max_epochs=90)),
        (4, 13, HeuristicConfig(plateau_epsilon=0.2, min_epoch=8), None,
         dict(enabled_slots=(False, True, True), auto_forward_g1=True, max_epochs=70)),
        (3, 14, None, None,
         dict(n_slots=1, auto_forward_g1=True, auto_forward_g2=True, auto_forward_g3=True, max_epochs=70)),
    ],
)
def test_matches_reference_and_masks(
    n_envs: int, seed: int, hcfg: HeuristicConfig | None, reset_at: dict | None, config: dict
) -> None:
    log = run(n_envs, seed, hcfg, reset_at, **config)
    ops = actions(log, "op")
    assert (ops == Op.GERMINATE).any(), "the controller never germinated"


def test_full_episode_matches_reference_and_ends_with_fossils() -> None:
    log = full_episode()  # every step already compared with the reference and validated
    final = log["final"]
    assert final["epoch"].tolist() == [150] * 16
    fossils = (final["slots"]["stage"] == Stage.FOSSILIZED).sum(-1)
    assert (fossils > 0).sum() >= 4, f"too few envs ended with fossils: {fossils.tolist()}"
    assert (final["n_fossilized"] == fossils).all()
    ops = actions(log, "op")
    for op in (Op.GERMINATE, Op.ADVANCE, Op.PRUNE, Op.FOSSILIZE):
        assert (ops == op).any(), f"{op.name} never chosen in a full episode"
    assert not (ops == Op.SET_ALPHA_TARGET).any()


# --- (c): behaviour, read off the logged trajectories -----------------------------------------
def test_one_live_seed_and_germination_rule() -> None:
    log = full_episode()
    h = HeuristicConfig()
    stage = series(log, "stage", slots=True)
    assert (np.isin(stage, LIVE).sum(-1) <= 1).all(), "more than one live seed at a time"
    ops, slots = actions(log, "op"), actions(log, "slot")
    epoch = series(log, "epoch")
    plateau = plateau_lengths(series(log, "val_acc"), h.plateau_epsilon)
    any_live, _ = target_slot(stage)
    can_germinate = np.stack([m["slot_by_op"][:, Op.GERMINATE] for m in log["masks"]])  # [T,E,S]
    # epochs since the controller's last PRUNE (no prune yet: long ago)
    since = np.full(ops.shape, NEVER_PRUNED)
    for t in range(ops.shape[0]):
        prev = since[t - 1] + 1 if t else np.full(ops.shape[1], NEVER_PRUNED)
        since[t] = prev
        if t:
            since[t] = np.where(ops[t - 1] == Op.PRUNE, 1, prev)

    germ = ops == Op.GERMINATE
    assert germ.sum() >= 16
    assert (epoch[germ] >= h.min_epoch).all()
    assert (plateau[germ] >= h.plateau_epochs).all()
    assert not any_live[germ].any()
    assert (since[germ] >= h.prune_cooldown).all()
    t_idx, e_idx = np.nonzero(germ)
    first_free = can_germinate[t_idx, e_idx].argmax(-1)
    assert (slots[germ] == first_free).all(), "germinated elsewhere than the lowest free slot"
    # and it germinates whenever the rule says so
    due = (
        ~any_live
        & (epoch >= h.min_epoch)
        & (plateau >= h.plateau_epochs)
        & (since >= h.prune_cooldown)
        & can_germinate.any(-1)
    )
    assert (germ == due).all()


def test_follows_the_rotation() -> None:
    log = full_episode()
    ops, bps = actions(log, "op"), actions(log, "blueprint")
    lengths = []
    for e in range(ops.shape[1]):
        seq = bps[ops[:, e] == Op.GERMINATE, e].tolist()
        lengths.append(len(seq))
        assert seq == [int(CNN_ROTATION[i % 5]) for i in range(len(seq))], f"env {e}: {seq}"
    assert max(lengths) >= 4


def test_skips_a_pruned_blueprint() -> None:
    log = sticky_penalty_episode()
    ops, bps = actions(log, "op"), actions(log, "blueprint")
    stage, blueprint = series(log, "stage", slots=True), series(log, "blueprint", slots=True)
    _, tgt = target_slot(stage)
    pruned_bp = at(blueprint, tgt)
    skips = 0
    for e in range(ops.shape[1]):
        pruned: set[int] = set()
        pointer = 0
        for t in range(ops.shape[0]):
            if ops[t, e] == Op.GERMINATE:
                chosen = int(bps[t, e])
                if len(pruned) < len(CNN_ROTATION):
                    assert chosen not in pruned, f"env {e} step {t}: re-germinated pruned {chosen}"
                    # the rotation pointer walks past exactly the pruned entries
                    k = 0
                    while int(CNN_ROTATION[(pointer + k) % 5]) in pruned:
                        k += 1
                    assert chosen == int(CNN_ROTATION[(pointer + k) % 5])
                    skips += k
                    pointer = (pointer + k + 1) % 5
            if ops[t, e] == Op.PRUNE:
                pruned.add(int(pruned_bp[t, e]))
    assert skips > 0, "no blueprint was ever skipped"


def test_prune_and_fossilize_rules() -> None:
    log = full_episode()
    h = HeuristicConfig()
    ops = actions(log, "op")
    stage = series(log, "stage", slots=True)
    any_live, tgt = target_slot(stage)
    acc = series(log, "val_acc")
    st = at(stage, tgt)
    e_in = at(series(log, "epochs_in_stage", slots=True), tgt)
    since_start = acc - at(series(log, "accuracy_at_stage_start", slots=True), tgt)
    total = acc - at(series(log, "accuracy_at_germination", slots=True), tgt)
    c = at(series(log, "contribution", slots=True), tgt)
    measured = at(series(log, "contribution_measured", slots=True), tgt)
    mode = at(series(log, "alpha_mode", slots=True), tgt)
    age = at(series(log, "seed_age", slots=True), tgt)

    holding = any_live & (st == Stage.HOLDING)
    fossil_rule = holding & measured & (c >= h.fossilize_contribution) & (total >= 0)
    assert fossil_rule.sum() > 0
    assert ((ops == Op.FOSSILIZE) == fossil_rule).all(), "FOSSILIZE exactly when contribution >= 0.5 and total >= 0"
    growing = any_live & np.isin(st, [Stage.TRAINING, Stage.BLENDING])
    failing = growing & (e_in >= h.prune_after_epochs) & ((since_start < 0) | (total <= -h.accuracy_drop))
    prunable = (age >= 5) & (mode == AlphaMode.HOLD)
    assert ((ops == Op.PRUNE) == ((failing | (holding & measured & ~fossil_rule)) & prunable)).all()
    assert (ops == Op.PRUNE).sum() > 0
    # a failing seed never advances; a measured HOLDING seed is fossilized or pruned, never held
    assert not (failing & (ops == Op.ADVANCE)).any()
    assert (ops[holding & measured & ~fossil_rule] == Op.PRUNE).all()
    assert (ops[holding & ~measured] == Op.WAIT).all()
    assert (ops[any_live & (st == Stage.GERMINATED)] == Op.ADVANCE).all()


# --- unit cases on a hand-built state ---------------------------------------------------------
def _hand_state(cfg: EngineConfig) -> dict:
    """One env per rule; slot 0 holds the seed under test, val_acc 60 everywhere."""
    st = make_state(cfg).to_dict()
    sl = st["slots"]
    st["val_acc"][:] = 60.0
    st["epoch"][:] = 20
    cases = [
        # stage, epochs_in_stage, acc at stage start, acc at germination, contribution, mode, extra
        (Stage.TRAINING, 5, 60.5, 59.0, 0.0, AlphaMode.HOLD),  # 0 failing: since start < 0 -> PRUNE
        (Stage.TRAINING, 12, 59.0, 58.0, 0.0, AlphaMode.HOLD),  # 1 G2 passes -> ADVANCE
        (Stage.TRAINING, 4, 65.0, 65.0, 0.0, AlphaMode.HOLD),  # 2 too young to judge, G2 fails -> WAIT
        (Stage.HOLDING, 3, 59.0, 59.0, 0.6, AlphaMode.HOLD),  # 3 -> FOSSILIZE
        (Stage.HOLDING, 3, 59.0, 61.0, 0.3, AlphaMode.HOLD),  # 4 hostage -> PRUNE
        (Stage.HOLDING, 3, 59.0, 59.0, 0.3, AlphaMode.HOLD),  # 5 undecided -> WAIT (PRUNE if configured)
        (Stage.BLENDING, 6, 61.0, 59.0, 0.0, AlphaMode.UP),  # 6 failing mid-ramp: PRUNE masked -> WAIT
        (Stage.BLENDING, 6, 59.0, 62.0, 0.0, AlphaMode.HOLD),  # 7 failing: dropped exactly 2 pp -> PRUNE
        (Stage.BLENDING, 5, 59.0, 59.0, 0.0, AlphaMode.HOLD),  # 8 ramp done, G3 passes -> ADVANCE
        (Stage.DORMANT, 0, 0.0, 0.0, 0.0, AlphaMode.HOLD),  # 9 no seed: GERMINATE (plateau in memory)
        (Stage.BLENDING, 6, 59.0, 61.5, 0.0, AlphaMode.HOLD),  # 10 dropped only 1.5 pp -> ADVANCE
        (Stage.HOLDING, 3, 59.0, 60.5, 0.8, AlphaMode.HOLD),  # 11 big contribution, total < 0 -> PRUNE
        (Stage.HOLDING, 3, 59.0, 60.0, 0.5, AlphaMode.HOLD),  # 12 contribution 0.5, total 0 -> FOSSILIZE
        (Stage.HOLDING, 3, 59.0, 59.0, 0.6, AlphaMode.HOLD),  # 13 not measured -> WAIT
    ]
    for e, (stage, eis, at_start, at_germ, c, mode) in enumerate(cases):
        if stage == Stage.DORMANT:
            continue
        sl["stage"][e, 0] = int(stage)
        sl["epochs_in_stage"][e, 0] = eis
        sl["seed_age"][e, 0] = eis + 12
        sl["blueprint"][e, 0] = int(Blueprint.NORM)
        sl["accuracy_at_stage_start"][e, 0] = at_start
        sl["accuracy_at_germination"][e, 0] = at_germ
        sl["contribution"][e, 0] = c
        sl["contribution_measured"][e, 0] = stage == Stage.HOLDING and e != 13
        sl["alpha_mode"][e, 0] = int(mode)
        full = stage == Stage.HOLDING or (stage == Stage.BLENDING and mode == AlphaMode.HOLD)
        sl["alpha"][e, 0] = 1.0 if full else 0.4 if stage == Stage.BLENDING else 0.0
        sl["alpha_target"][e, 0] = 1.0 if stage in (Stage.BLENDING, Stage.HOLDING) else 0.0
        sl["gradient_measured"][e, 0] = True
        sl["gradient_health"][e, 0] = 0.9
    return st


@pytest.mark.parametrize("prune_undecided", [False, True])
def test_rules_on_hand_built_states(prune_undecided: bool) -> None:
    cfg = EngineConfig(n_envs=14, n_slots=3)
    hcfg = HeuristicConfig(prune_undecided_holding=prune_undecided)
    st = _hand_state(cfg)
    masks = compute_masks(st, SpecTables(cfg.topology, cfg.n_slots), cfg)
    memory = initial_memory(cfg.n_envs, "cpu")
    memory["plateau"][:] = 2  # this call's flat gain makes it 3
    memory["has_prev"][:] = True
    memory["prev_acc"][:] = 60.0
    memory["penalty"][:, int(Blueprint.NORM)] = 1.0
    action, new = heuristic_step(memory, st, masks, HeuristicTables(cfg, hcfg), hcfg, cfg)
    W, G, P, F, A = Op.WAIT, Op.GERMINATE, Op.PRUNE, Op.FOSSILIZE, Op.ADVANCE
    expected = [P, A, W, F, P, P if prune_undecided else W, W, P, A, G, A, P, F, W]
    assert action["op"].tolist() == [int(o) for o in expected]
    validate_action(action, masks, cfg)
    assert action["slot"].tolist() == [0] * 14
    assert action["blueprint"][9].item() == Blueprint.CONV_LIGHT
    # memory: prunes penalise NORM (1 halved, + 2) and restart the cooldown; germination rotates
    pruned = action["op"] == int(Op.PRUNE)
    assert torch.equal(new["penalty"][:, int(Blueprint.NORM)], torch.where(pruned, 2.5, 0.5))
    assert torch.equal(new["epochs_since_prune"], torch.where(pruned, 0, NEVER_PRUNED))
    assert new["rotation_index"].tolist() == [0] * 9 + [1] + [0] * 4
    assert new["plateau"].tolist() == [3] * 14
    # the reference agrees on every env
    state_np = {k: v.numpy() for k, v in st.items() if k != "slots"}
    state_np["slots"] = {k: v.numpy() for k, v in st["slots"].items()}
    refs = [RefHeuristic(cfg, hcfg) for _ in range(cfg.n_envs)]
    for ref in refs:
        ref.plateau, ref.has_prev, ref.prev_acc = 2, True, 60.0
        ref.penalty[int(Blueprint.NORM)] = 1.0
    ref_action = ref_heuristic_actions(refs, state_np)
    for name in HEAD_NAMES:
        np.testing.assert_array_equal(action[name].numpy(), ref_action[name], err_msg=name)


def test_germination_conditions_and_penalty_threshold() -> None:
    """epoch >= 5, plateau >= 3, cooldown >= 5 and skip-while->=3, each at its boundary."""
    cfg = EngineConfig(n_envs=8, n_slots=2)
    hcfg = HeuristicConfig()
    st = make_state(cfg).to_dict()
    st["val_acc"][:] = 50.0
    st["epoch"][:] = torch.tensor([5, 4, 5, 5, 5, 5, 5, 5])
    masks = compute_masks(st, SpecTables(cfg.topology, cfg.n_slots), cfg)
    memory = initial_memory(cfg.n_envs, "cpu")
    memory["has_prev"][:] = True
    memory["prev_acc"][:] = torch.tensor([50.0, 50.0, 50.0, 49.0, 50.0, 50.0, 50.0, 50.0])  # env 3: gain 1 pp
    memory["plateau"][:] = torch.tensor([2, 2, 1, 5, 2, 2, 2, 2])  # env 2: plateau only 2
    memory["epochs_since_prune"][:] = torch.tensor([4, 9, 9, 9, 3, 9, 9, 9])  # env 4: pruned 4 ago
    # penalties after this call's halving: env 5 CONV_LIGHT 3.0 (skip), env 6 2.95 (keep),
    # env 7 every rotation entry >= 3 -> least penalised (NORM)
    memory["penalty"][5, int(Blueprint.CONV_LIGHT)] = 6.0
    memory["penalty"][6, int(Blueprint.CONV_LIGHT)] = 5.9
    memory["penalty"][7, [int(b) for b in CNN_ROTATION]] = torch.tensor([10.0, 9.0, 8.0, 7.0, 7.5])
    action, new = heuristic_step(memory, st, masks, HeuristicTables(cfg, hcfg), hcfg, cfg)
    G, W = int(Op.GERMINATE), int(Op.WAIT)
    assert action["op"].tolist() == [G, W, W, W, W, G, G, G]
    assert action["blueprint"][5].item() == Blueprint.CONV_HEAVY
    assert action["blueprint"][6].item() == Blueprint.CONV_LIGHT
    assert action["blueprint"][7].item() == Blueprint.NORM
    assert new["rotation_index"].tolist() == [1, 0, 0, 0, 0, 2, 1, 0]
    assert new["plateau"].tolist() == [3, 3, 2, 0, 3, 3, 3, 3]


# --- (d) reset(rows) ---------------------------------------------------------------------------
def test_reset_clears_only_selected_rows() -> None:
    cfg = EngineConfig(n_envs=6, seed=5, max_epochs=60)
    engine = Engine(cfg)
    engine.reset()
    ctrl = HeuristicController(cfg, HeuristicConfig(blueprint_penalty_decay=1.0))
    for _ in range(45):
        engine.step(ctrl.act(engine.lifecycle_state, engine.masks))
    assert (ctrl.memory["rotation_index"] > 0).any() and ctrl.memory["has_prev"].all()
    ctrl.memory["penalty"] = ctrl.memory["penalty"] + torch.rand(6, 13) + 0.1  # make every row differ
    before = {k: v.clone() for k, v in ctrl.memory.items()}
    rows = torch.tensor([True, False, True, False, False, True])
    ctrl.reset(rows)
    fresh = initial_memory(cfg.n_envs, "cpu")
    for k, v in ctrl.memory.items():
        assert torch.equal(v[rows], fresh[k][rows]), k
        assert torch.equal(v[~rows], before[k][~rows]), k
    with pytest.raises(ValueError):
        ctrl.reset(torch.ones(5, dtype=torch.bool))


# --- purity: the step compiles as one graph and gives the eager result ------------------------
def test_step_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    cfg = EngineConfig(n_envs=4, seed=9, max_epochs=40)
    hcfg = HeuristicConfig()
    engine = Engine(cfg)
    engine.reset()
    tables = HeuristicTables(cfg, hcfg)
    step = functools.partial(heuristic_step, tables=tables, hcfg=hcfg, cfg=cfg)
    compiled = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND)
    mem_e = mem_c = initial_memory(cfg.n_envs, "cpu")
    for _ in range(25):
        a_e, mem_e = step(mem_e, engine.lifecycle_state, engine.masks)
        a_c, mem_c = compiled(mem_c, engine.lifecycle_state, engine.masks)
        for name in HEAD_NAMES:
            assert torch.equal(a_e[name], a_c[name]), name
        for k in mem_e:
            assert torch.equal(mem_e[k], mem_c[k]), k
        engine.step(a_e)
