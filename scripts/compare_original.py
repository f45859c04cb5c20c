"""Step-by-step comparison of our lifecycle with the original system's own ``SeedSlot``.

The original (tachyon-beep/esper-lite, package ``esper``) is imported at run time from the path in
``--esper-src`` or ``$ESPER_LITE_SRC``; nothing of it is part of this repository or its
dependencies. Per env, one original ``SeedSlot`` per slot is driven through the per-epoch order of
the original's RL trainer, emulated here around the slots (its trainer needs CUDA streams, real
hosts and torchvision):

    decision at epoch t (observation and masks from the state after epoch t's record):
      handler of the op (``simic/training/handlers``; FOSSILIZE through the trainer's
        ``_fossilize_active_seed``: ``advance_stage(FOSSILIZED)`` then ``set_alpha(1)``);
      last_action_success / last_action_op; ``gradient_health_prev`` and
        ``epochs_since_counterfactual`` from the *pre-action* reports (``action_execution``);
      ``step_epoch()`` of every slot, then the trainer's per-slot cleanup;
    epoch t+1:
      gradient stats for active TRAINING/BLENDING seeds (``batch_ops``), ratio EMA 0.9/0.1;
      counterfactual: interaction_sum reset for every active seed, then for active seeds with
        alpha > 0 that are not FOSSILIZED: contribution, velocity EMA, freshness reset
        (``vectorized_trainer._build_fused_val_configs`` and the solo-result loop);
      ``record_accuracy(val_acc)`` for every slot with a state; ``sync_telemetry`` (with gradient
        stats for the measured slots, without for the other active ones);
      observation by the original's ``batch_obs_to_features``, masks by its ``compute_action_masks``.

Our side is the batched engine (``core.step.before_host`` + ``after_host``: op, tick, record epoch,
observation and masks), all episodes of a mode as one batch. Both sides get identical metric inputs
and the same actions, drawn from *our* masks (the original's masks are compared, not used).

SPEC §15's deliberate differences are kept out of the mismatch count and counted separately:
- cooldown counters: the original's loop counts EMBARGOED/RESETTING epochs twice (its
  ``record_accuracy`` and ``step_epoch``); the original side here takes back the record's count
  for those two stages (``aligned_cooldown``), so the timelines stay comparable;
- contribution velocity: the original observes 0 (its report drops the field);
- counterfactual freshness of a never-measured seed: ours -1, the original 1.0 and decaying.

Run: ``ESPER_LITE_SRC=/path/to/esper-lite/src python scripts/compare_original.py``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import as_bool, head_views
from esper_soa.core.spec import (
    HEAD_NAMES,
    METRIC_FIELDS,
    N_STAGE_ONEHOT,
    OBS_BASE,
    OBS_SLOT,
    Op,
    SpecTables,
    Stage,
)
from esper_soa.core.state import as_dict, make_state
from esper_soa.core.step import after_host, before_host, emit, first_epoch
from esper_soa.dynamics.synthetic import synthetic_metrics, weighted_masked_action

ENV_VAR = "ESPER_LITE_SRC"

MODES: dict[str, dict[str, Any]] = {
    "permissive": dict(gate_mode="permissive"),
    "strict": dict(gate_mode="strict"),
    "auto": dict(gate_mode="permissive", auto_forward_g1=True, auto_forward_g2=True, auto_forward_g3=True),
    "strict_auto": dict(gate_mode="strict", auto_forward_g1=True, auto_forward_g2=True, auto_forward_g3=True),
    "auto_g2": dict(gate_mode="permissive", auto_forward_g2=True),
    "auto_g3": dict(gate_mode="permissive", auto_forward_g3=True),
}

_ONEHOT_STAGES = [s for s in Stage]  # one-hot position -> stage (code order, 5 unused)
OBS_BASE_NAMES = (
    ["epoch", "val_loss", "val_acc"]
    + [f"loss_history[{i}]" for i in range(5)]
    + [f"acc_history[{i}]" for i in range(5)]
    + ["n_training", "n_blending", "n_holding", "last_action_success"]
    + [f"last_op[{Op(i).name}]" for i in range(len(Op))]
)
OBS_SLOT_NAMES = (
    ["has_seed"]
    + [f"stage[{_ONEHOT_STAGES[i].name}]" for i in range(N_STAGE_ONEHOT)]
    + [
        "alpha", "contribution", "contribution_velocity", "tempo", "alpha_target", "alpha_mode",
        "alpha_steps_total", "alpha_steps_done", "steps_to_target", "alpha_velocity", "algorithm",
        "interaction_sum", "gradient_norm", "gradient_health", "has_vanishing", "has_exploding",
        "previous_gradient_health", "epochs_in_stage", "cf_freshness", "seed_age",
    ]
)
assert len(OBS_BASE_NAMES) == OBS_BASE and len(OBS_SLOT_NAMES) == OBS_SLOT

# state fields compared per slot (ours name -> how the original's SeedState holds it)
SLOT_FIELDS = (
    "stage", "epochs_in_stage", "seed_age", "previous_stage", "previous_epochs_in_stage",
    "alpha", "alpha_start", "alpha_target", "alpha_mode", "alpha_steps_total", "alpha_steps_done",
    "accuracy_at_stage_start", "accuracy_at_germination", "contribution", "contribution_measured",
    "interaction_sum", "gradient_measured", "gradient_health", "has_exploding", "gradient_ratio",
)
LIFECYCLE_FIELDS = SLOT_FIELDS[: SLOT_FIELDS.index("contribution")]  # stage .. accuracy_at_germination
MASK_HEADS = ("op", "slot_by_op", "blueprint", "style", "tempo", "alpha_target", "alpha_speed", "alpha_curve")
SECTION15 = ("§15 cooldown counters", "§15 contribution velocity", "§15 freshness never measured")

# op preference for the mask-respecting draws (WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE,
# FOSSILIZE, ADVANCE): progress-biased so seeds reach BLENDING, HOLDING and FOSSILIZED
OP_WEIGHTS = np.array([1.0, 2.0, 0.7, 0.3, 3.0, 3.0])


def load_original(src: str | None = None) -> SimpleNamespace:
    """Import the original's modules from ``src`` (or ``$ESPER_LITE_SRC``); ImportError if absent."""
    src = src or os.environ.get(ENV_VAR)
    if not src:
        raise ImportError(f"the original's source path is not set (pass --esper-src or set ${ENV_VAR})")
    if not os.path.isdir(os.path.join(src, "esper")):
        raise ImportError(f"{src!r} has no 'esper' package (expected esper-lite's src/ folder)")
    if "esper" not in sys.modules:  # the package from ``src`` itself; its submodules resolve from it
        spec = importlib.machinery.PathFinder.find_spec("esper", [src])
        package = importlib.util.module_from_spec(spec)
        sys.modules["esper"] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules["esper"]
            raise
    names = dict(
        slot="esper.kasmina.slot",
        host="esper.kasmina.host",
        leyline="esper.leyline",
        slot_config="esper.leyline.slot_config",
        masks="esper.tamiyo.policy.action_masks",
        features="esper.tamiyo.policy.features",
        handlers="esper.simic.training.handlers",
        env_state="esper.simic.training.parallel_env_state",
    )
    return SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


# ================================================================================================
# The original side: one env of the original's RL trainer, emulated around its SeedSlots
# ================================================================================================
class OriginalEnv:
    """One env: ``SeedSlot`` per slot plus the trainer's per-env tracking the observation reads."""

    def __init__(self, o: SimpleNamespace, cfg: EngineConfig, channels: int = 16, aligned_cooldown: bool = True):
        self.o = o
        self.cfg = cfg
        self.aligned_cooldown = aligned_cooldown
        self.slot_ids = tuple(f"r0c{i}" for i in range(cfg.n_slots))
        self.slot_config = o.slot_config.SlotConfig(slot_ids=self.slot_ids)
        gates = o.slot.QualityGates(permissive=cfg.gate_mode == "permissive")
        GL = o.leyline.GateLevel
        auto = frozenset(
            g for g, on in ((GL.G1, cfg.auto_forward_g1), (GL.G2, cfg.auto_forward_g2), (GL.G3, cfg.auto_forward_g3)) if on
        )
        self.slots = {}
        for sid in self.slot_ids:
            slot = o.slot.SeedSlot(sid, channels, "cpu", gates, fast_mode=True)
            slot.auto_forward_gates = auto
            self.slots[sid] = slot
        self.model = _model_standin(o)(self.slots)
        self.env = _env_standin(o)()
        self.epoch = 0
        self.loss_history: list[float] = []
        self.acc_history: list[float] = []
        self.val_loss = 0.0
        self.cooldown_skips = 0  # §15: EMBARGOED/RESETTING epochs the original counts twice

    # --- one host epoch (train pass, fused val pass, record, telemetry sync) -------------------
    def run_epoch(self, m: dict[str, Any]) -> None:
        env, SS = self.env, self.o.leyline.SeedStage
        self.epoch += 1
        val_acc = float(m["val_acc"])
        env.val_acc = val_acc
        self.val_loss = float(m["val_loss"])
        grad_slots = [
            sid for sid, slot in self.slots.items()
            if slot.is_active and slot.state.stage in (SS.TRAINING, SS.BLENDING)
        ]
        for sid, slot in self.slots.items():  # interaction metrics reset at the val pass start
            if slot.is_active:
                slot.state.metrics.interaction_sum = 0.0
        for s, (sid, slot) in enumerate(self.slots.items()):
            if not slot.is_active or slot.alpha <= 0 or slot.state.stage == SS.FOSSILIZED:
                continue
            metrics = slot.state.metrics
            new = val_acc - float(m["acc_without_slot"][s])
            if metrics._prev_contribution is not None:
                metrics.contribution_velocity = 0.7 * metrics.contribution_velocity + 0.3 * (new - metrics._prev_contribution)
            metrics._prev_contribution = new
            metrics.counterfactual_contribution = new
            env.epochs_since_counterfactual[sid] = 0
            metrics.interaction_sum = float(m["interaction_sum"][s])  # the pair terms' sum, as an input
        for sid, slot in self.slots.items():
            if slot.state is None:
                continue
            slot.state.metrics.record_accuracy(val_acc)
            if self.aligned_cooldown and slot.state.stage in (SS.EMBARGOED, SS.RESETTING):
                # §15: keep the record (current accuracy), drop its second count of the epoch
                slot.state.metrics.epochs_total -= 1
                slot.state.metrics.epochs_in_current_stage -= 1
                self.cooldown_skips += 1
        for s, (sid, slot) in enumerate(self.slots.items()):
            if not slot.is_active:
                continue
            if sid in grad_slots:
                ratio = float(m["gradient_ratio"][s])
                prev = env.gradient_ratio_ema.get(sid)
                ema = ratio if prev is None else 0.9 * prev + 0.1 * ratio
                env.gradient_ratio_ema[sid] = ema
                slot.state.metrics.seed_gradient_norm_ratio = ema
                slot.state.sync_telemetry(
                    gradient_norm=float(m["gradient_norm"][s]),
                    gradient_health=float(m["gradient_health"][s]),
                    has_vanishing=bool(m["has_vanishing"][s]),
                    has_exploding=bool(m["has_exploding"][s]),
                    epoch=self.epoch,
                    max_epochs=self.cfg.max_epochs,
                )
            else:
                slot.state.sync_telemetry(epoch=self.epoch, max_epochs=self.cfg.max_epochs)
        self.loss_history = (self.loss_history + [self.val_loss])[-5:]
        self.acc_history = (self.acc_history + [val_acc])[-5:]

    # --- observation and masks for the decision --------------------------------------------------
    def reports(self) -> dict[str, Any]:
        return self.model.get_slot_reports()

    def observe(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        o = self.o
        signal = SimpleNamespace(
            metrics=SimpleNamespace(epoch=self.epoch, val_loss=self.val_loss, val_accuracy=self.env.val_acc),
            loss_history=list(self.loss_history),
            accuracy_history=list(self.acc_history),
        )
        reports = self.reports()
        obs, bp = o.features.batch_obs_to_features(
            [signal], [reports], [self.env], self.slot_config, torch.device("cpu"), max_epochs=self.cfg.max_epochs
        )
        masks = o.masks.compute_action_masks(
            o.masks.build_slot_states(reports, list(self.slot_ids)),
            list(self.slot_ids),
            total_seeds=self.model.total_seeds(),
            max_seeds=self.cfg.max_seeds,
            slot_config=self.slot_config,
            topology=self.cfg.topology,
            disable_advance=self.cfg.all_auto_forward,
        )
        return obs[0].numpy(), bp[0].numpy(), {k: v.numpy() for k, v in masks.items()}

    # --- the decision ----------------------------------------------------------------------------
    def decide(self, a: dict[str, int]) -> bool:
        """Execute one action the way ``action_execution`` does; returns its success."""
        o, env = self.o, self.env
        h = o.handlers
        pre_reports = self.reports()
        op = int(a["op"])
        sid = self.slot_ids[int(a["slot"])]
        slot = self.slots[sid]
        seed_state = slot.state if slot.is_active else None
        ctx = h.HandlerContext(
            env_idx=0, slot_id=sid, env_state=env, model=self.model, slot=slot, seed_state=seed_state,
            epoch=self.epoch, max_epochs=self.cfg.max_epochs, episodes_completed=0,
        )
        seed_info = None
        if seed_state is not None:
            metrics = seed_state.metrics
            seed_info = SimpleNamespace(seed_age_epochs=metrics.epochs_total, total_improvement=metrics.total_improvement)
        if op == Op.WAIT:
            success = True
        elif op == Op.GERMINATE:
            params = h.GerminateParams(
                blueprint_idx=int(a["blueprint"]), style_idx=int(a["style"]), tempo_idx=int(a["tempo"]),
                alpha_target=o.leyline.ALPHA_TARGET_VALUES[int(a["alpha_target"])],
            )
            success = h.execute_germinate(ctx, params).success
        elif op == Op.SET_ALPHA_TARGET:
            params = h.AlphaTargetParams(
                alpha_target_idx=int(a["alpha_target"]), alpha_speed_idx=int(a["alpha_speed"]),
                alpha_curve_idx=int(a["alpha_curve"]), style_idx=int(a["style"]),
            )
            success = h.execute_set_alpha_target(ctx, params).success
        elif op == Op.PRUNE:
            params = h.PruneParams(alpha_speed_idx=int(a["alpha_speed"]), alpha_curve_idx=int(a["alpha_curve"]))
            success = h.execute_prune(ctx, params, seed_info).success
        elif op == Op.FOSSILIZE:
            success = h.execute_fossilize(ctx, seed_info, _fossilize_active_seed).success
        elif op == Op.ADVANCE:
            success = h.execute_advance(ctx).success
        else:
            raise ValueError(f"op {op} out of range")
        env.last_action_success = success
        env.last_action_op = op
        for s_id in self.slot_ids:  # Obs V3 tracking from the reports of this decision
            if s_id not in pre_reports:
                continue
            telemetry = pre_reports[s_id].telemetry
            if telemetry is not None and telemetry.gradient_health is not None:
                env.gradient_health_prev[s_id] = telemetry.gradient_health
            if s_id in env.epochs_since_counterfactual:
                env.epochs_since_counterfactual[s_id] += 1
            else:
                env.epochs_since_counterfactual[s_id] = 0
        for s_id, s in self.slots.items():  # mechanical lifecycle advance
            s.step_epoch()
            if s.state and s.state.metrics.auto_pruned:
                s.state.metrics.auto_pruned = False
            if not self.model.has_active_seed_in_slot(s_id):
                env.seed_optimizers.pop(s_id, None)
                env.acc_at_germination.pop(s_id, None)
                env.gradient_ratio_ema.pop(s_id, None)
            if s.state is None:
                env.clear_obs_v3_slot_tracking(s_id)
        return bool(success)

    # --- per-slot values under our field names ---------------------------------------------------
    def slot_values(self, s: int) -> dict[str, float] | None:
        st = self.slots[self.slot_ids[s]].state
        if st is None:
            return None
        m, c, t = st.metrics, st.alpha_controller, st.telemetry
        return {
            "stage": int(st.stage.value),
            "epochs_in_stage": m.epochs_in_current_stage,
            "seed_age": m.epochs_total,
            "previous_stage": int(st.previous_stage.value),
            "previous_epochs_in_stage": st.previous_epochs_in_stage,
            "alpha": st.alpha,
            "alpha_start": c.alpha_start,
            "alpha_target": c.alpha_target,
            "alpha_mode": int(c.alpha_mode),
            "alpha_steps_total": c.alpha_steps_total,
            "alpha_steps_done": c.alpha_steps_done,
            "accuracy_at_stage_start": m.accuracy_at_stage_start,
            "accuracy_at_germination": m.initial_val_accuracy,
            "contribution": m.counterfactual_contribution if m.counterfactual_contribution is not None else 0.0,
            "contribution_measured": float(m.counterfactual_contribution is not None),
            "interaction_sum": m.interaction_sum,
            "gradient_measured": float(t is not None and t.gradient_health is not None),
            "gradient_health": (t.gradient_health if t is not None and t.gradient_health is not None else None),
            "has_exploding": float(bool(t is not None and t.has_exploding)),
            "gradient_ratio": m.seed_gradient_norm_ratio,
        }


def _fossilize_active_seed(model: Any, slot_id: str) -> bool:
    """The trainer's fossilize callback (``simic/training/vectorized.py``), whose module needs
    torchvision: HOLDING only, ``advance_stage(FOSSILIZED)``, then alpha 1 on a pass."""
    if not model.has_active_seed_in_slot(slot_id):
        return False
    slot = model.seed_slots[slot_id]
    if slot.state is None or slot.state.stage.name != "HOLDING":
        return False
    stage = type(slot.state.stage)
    if slot.advance_stage(stage.FOSSILIZED).passed:
        slot.set_alpha(1.0)
        return True
    return False


def _model_standin(o: SimpleNamespace) -> type:
    """A host with just the slots: the original's ``MorphogeneticModel`` seed-query methods."""
    MM = o.host.MorphogeneticModel

    def __init__(self, slots):  # noqa: N807
        self.seed_slots = slots

    def germinate_seed(self, blueprint_id, seed_id, *, slot, blend_algorithm_id="sigmoid", blend_tempo_epochs=5,
                       alpha_algorithm=None, alpha_target=None):
        kw = {} if alpha_algorithm is None else {"alpha_algorithm": alpha_algorithm}
        self.seed_slots[slot].germinate(
            blueprint_id=blueprint_id, seed_id=seed_id, host_module=None, blend_algorithm_id=blend_algorithm_id,
            blend_tempo_epochs=blend_tempo_epochs, alpha_target=alpha_target, topology="cnn", **kw,
        )

    methods = ("has_active_seed_in_slot", "get_slot_reports", "count_active_seeds", "count_fossilized_seeds", "total_seeds")
    return type("SlotsOnlyModel", (), {"__init__": __init__, "germinate_seed": germinate_seed,
                                       **{n: getattr(MM, n) for n in methods}})


def _env_standin(o: SimpleNamespace) -> type:
    """The ``ParallelEnvState`` fields the handlers, observation and cleanup touch."""
    PES = o.env_state.ParallelEnvState

    def __init__(self):  # noqa: N807
        self.val_acc = 0.0
        self.last_action_success = True
        self.last_action_op = 0
        self.gradient_health_prev: dict[str, float] = {}
        self.epochs_since_counterfactual: dict[str, int] = {}
        self.gradient_ratio_ema: dict[str, float] = {}
        self.acc_at_germination: dict[str, float] = {}
        self.escrow_credit: dict[str, float] = {}
        self.seed_optimizers: dict[str, Any] = {}
        self.scaffold_boost_ledger: dict[str, list] = {}
        self.seeds_created = self.germinate_count = self.prune_count = 0
        self.seeds_fossilized = self.fossilize_count = self.contributing_fossilized = 0
        self.pending_hindsight_credit = 0.0
        self.needs_governor_snapshot = False

    return type("EnvStateStandIn", (), {
        "__init__": __init__,
        "init_obs_v3_slot_tracking": PES.init_obs_v3_slot_tracking,
        "clear_obs_v3_slot_tracking": PES.clear_obs_v3_slot_tracking,
    })


# ================================================================================================
# Our side: the batched engine
# ================================================================================================
class Ours:
    """All envs of a mode in one batch: the engine's ``before_host`` + ``after_host``."""

    def __init__(self, cfg: EngineConfig, first_metrics: dict[str, np.ndarray]):
        self.cfg = cfg
        self.tables = SpecTables(cfg.topology, cfg.n_slots)
        self.state = first_epoch(as_dict(make_state(cfg)), _tensors(first_metrics))
        self.out = emit(self.state, self.tables, cfg)
        self.success = np.ones(cfg.n_envs)

    def step(self, actions: dict[str, np.ndarray], metrics: dict[str, np.ndarray]) -> None:
        new, _op, success, reward = before_host(self.state, _tensors(actions), self.tables, self.cfg)
        self.state, self.out = after_host(new, _tensors(metrics), reward, self.tables, self.cfg)
        self.success = success.numpy()

    def masks(self) -> dict[str, np.ndarray]:
        masks = as_bool(self.out["masks"])
        views = {**head_views(masks), "slot_by_op": masks["slot_by_op"]}  # the original's per-head names
        return {k: views[k].numpy() for k in MASK_HEADS}

    def slots(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.state["slots"].items()}


def _tensors(d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in d.items()}


# ================================================================================================
# Inputs
# ================================================================================================
class MetricStream:
    """Identical metric inputs for both sides: per env a drifting host, noisy counterfactuals and
    gradient telemetry that passes and fails every gate now and then."""

    def __init__(self, rng: np.random.Generator, n_envs: int, n_slots: int):
        self.rng, self.E, self.S = rng, n_envs, n_slots
        self.acc = rng.uniform(30.0, 50.0, n_envs)

    def next(self) -> dict[str, np.ndarray]:
        r, E, S = self.rng, self.E, self.S
        self.acc = np.clip(self.acc + r.normal(0.3, 1.0, E), 1.0, 99.0)
        return synthetic_metrics(r, self.acc.astype(np.float32), S, host_params=1e5, spread=1.5)


def draw_actions(rng: np.random.Generator, masks: dict[str, np.ndarray], n_slots: int) -> dict[str, np.ndarray]:
    """One mask-respecting action per env: an allowed op (``OP_WEIGHTS``), an allowed slot, heads."""
    n_envs = masks["op"].shape[0]
    out = {k: np.zeros(n_envs, dtype=np.int64) for k in HEAD_NAMES}
    for e in range(n_envs):
        for k, v in weighted_masked_action(rng, masks, e, OP_WEIGHTS).items():
            out[k][e] = v
    return out


# ================================================================================================
# Comparison
# ================================================================================================
@dataclass
class Mismatch:
    field: str
    env: int
    step: int  # decisions taken before the compared state (0 = after reset)
    slot: int  # -1 for env-level fields
    ours: Any
    orig: Any


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-5)


def compare_env(
    e: int, step: int, ours_slots: dict[str, np.ndarray], ours_obs: np.ndarray, ours_bp: np.ndarray,
    ours_masks: dict[str, np.ndarray], ours_success: float | None, orig: OriginalEnv, orig_success: bool | None,
) -> tuple[list[Mismatch], Counter]:
    """Every compared value of one env after one step: (mismatches, §15 counts)."""
    out: list[Mismatch] = []
    sec15: Counter = Counter()
    obs, bp, masks = orig.observe()

    def check(name: str, slot: int, a: Any, b: Any) -> None:
        if not _close(a, b):
            out.append(Mismatch(name, e, step, slot, a, b))

    if ours_success is not None:
        check("op success", -1, ours_success, float(orig_success))
    for s in range(orig.cfg.n_slots):
        ov = orig.slot_values(s)
        our_stage = int(ours_slots["stage"][e, s])
        if ov is None:
            check("stage", s, our_stage, int(Stage.DORMANT))
            continue
        measured_grad = bool(ours_slots["gradient_measured"][e, s])
        for name in SLOT_FIELDS:
            a = ours_slots[name][e, s]
            b = ov[name]
            if name in ("gradient_health", "gradient_ratio"):
                if b is None and not measured_grad:
                    continue
                if b is None or not measured_grad:
                    out.append(Mismatch(name, e, step, s, a if measured_grad else None, b))
                    continue
            check(name, s, a, b)
    for i, name in enumerate(OBS_BASE_NAMES):
        check(f"obs.{name}", -1, ours_obs[i], obs[i])
    for s in range(orig.cfg.n_slots):
        base = OBS_BASE + OBS_SLOT * s
        for i, name in enumerate(OBS_SLOT_NAMES):
            a, b = ours_obs[base + i], obs[base + i]
            if _close(a, b):
                continue
            if name == "contribution_velocity" and b == 0.0:
                sec15[SECTION15[1]] += 1
            elif name == "cf_freshness" and a == -1.0 and not ours_slots["contribution_measured"][e, s]:
                sec15[SECTION15[2]] += 1
            else:
                out.append(Mismatch(f"obs.slot.{name}", e, step, s, a, b))
        check("blueprint_index", s, ours_bp[s], bp[s])
    for k in MASK_HEADS:
        if not np.array_equal(ours_masks[k][e], masks[k]):
            out.append(Mismatch(f"mask.{k}", e, step, -1, ours_masks[k][e].astype(int).tolist(), masks[k].astype(int).tolist()))
    return out, sec15


def _is_lifecycle(name: str) -> bool:
    """Fields whose divergence changes the rest of the episode (the ops' and gates' inputs)."""
    return name in LIFECYCLE_FIELDS or name == "op success" or name.startswith("mask.")


@dataclass
class ModeResult:
    mode: str
    n_env_steps: int = 0
    counts: Counter = field(default_factory=Counter)  # field -> mismatching (env, step, slot) count
    first: Counter = field(default_factory=Counter)  # field -> episodes where it was off when the lifecycle diverged
    sec15: Counter = field(default_factory=Counter)
    examples: dict[str, Mismatch] = field(default_factory=dict)  # field -> earliest occurrence
    traces: dict[int, list] = field(default_factory=dict)  # env -> [(action, metrics)] per step


def env_row(batch: dict[str, np.ndarray], e: int) -> dict[str, Any]:
    return {k: v[e] for k, v in batch.items()}


def run_mode(
    o: SimpleNamespace, mode: str, episodes: int, steps: int, seed: int = 0, n_slots: int = 3,
    aligned_cooldown: bool = True,
) -> ModeResult:
    """``episodes`` envs (one batch on our side) x ``steps`` decisions in one gate/auto mode."""
    cfg = EngineConfig(n_envs=episodes, n_slots=n_slots, max_epochs=steps, **MODES[mode])
    rng = np.random.default_rng(seed)
    stream = MetricStream(rng, episodes, n_slots)
    m0 = stream.next()
    ours = Ours(cfg, m0)
    origs = [OriginalEnv(o, cfg, aligned_cooldown=aligned_cooldown) for _ in range(episodes)]
    res = ModeResult(mode)
    first_seen: set[int] = set()
    for e, orig in enumerate(origs):
        orig.run_epoch(env_row(m0, e))
        res.traces[e] = [(None, env_row(m0, e))]

    def compare_all(step: int, orig_success: list[bool | None]) -> None:
        slots, obs, bp, masks = ours.slots(), ours.out["observation"].numpy(), ours.out["blueprint_index"].numpy(), ours.masks()
        for e, orig in enumerate(origs):
            mism, sec15 = compare_env(
                e, step, slots, obs[e], bp[e], masks, None if step == 0 else float(ours.success[e]), orig, orig_success[e]
            )
            res.sec15.update(sec15)
            res.n_env_steps += 1
            for mm in mism:
                res.counts[mm.field] += 1
                if mm.field not in res.examples or mm.step < res.examples[mm.field].step:
                    res.examples[mm.field] = mm
            if e not in first_seen and any(_is_lifecycle(mm.field) for mm in mism):
                first_seen.add(e)  # the episode's lifecycle diverges here: every field off now
                for name in sorted({mm.field for mm in mism}):
                    res.first[name] += 1

    compare_all(0, [None] * episodes)
    for step in range(1, steps + 1):
        actions = draw_actions(rng, ours.masks(), n_slots)
        metrics = stream.next()
        succ = []
        for e, orig in enumerate(origs):
            a = env_row(actions, e)
            succ.append(orig.decide(a))
            orig.run_epoch(env_row(metrics, e))
            res.traces[e].append((a, env_row(metrics, e)))
        ours.step(actions, metrics)
        compare_all(step, succ)
    res.sec15[SECTION15[0]] = sum(orig.cooldown_skips for orig in origs)
    return res


def replay(o: SimpleNamespace, mode: str, trace: list, n_slots: int = 3, max_epochs: int = 150) -> list[Mismatch]:
    """One env through a given [(action or None, metrics row)] sequence (first entry: the reset's
    metrics); returns every non-§15 mismatch. For hand-written repros and the tests."""
    cfg = EngineConfig(n_envs=1, n_slots=n_slots, max_epochs=max_epochs, **MODES[mode])

    def batch(row: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: np.asarray(row[k])[None] for k in row}

    ours = Ours(cfg, batch(trace[0][1]))
    orig = OriginalEnv(o, cfg)
    orig.run_epoch(trace[0][1])
    found, _ = compare_env(0, 0, ours.slots(), ours.out["observation"].numpy()[0], ours.out["blueprint_index"].numpy()[0],
                           ours.masks(), None, orig, None)
    for step, (a, m) in enumerate(trace[1:], start=1):
        ours.step(batch(a), batch(m))
        ok = orig.decide(a)
        orig.run_epoch(m)
        mism, _ = compare_env(0, step, ours.slots(), ours.out["observation"].numpy()[0],
                              ours.out["blueprint_index"].numpy()[0], ours.masks(), float(ours.success[0]), orig, ok)
        found += mism
    return found


def metrics_row(n_slots: int = 3, **kw: Any) -> dict[str, Any]:
    """A metric input row (one env) with quiet defaults; keyword arguments override fields,
    scalars broadcast over slots."""
    row = dict(
        val_loss=1.0, val_acc=40.0, acc_all_seeds_off=40.0, acc_committed=40.0, host_params=1e5, diverged=False,
        acc_without_slot=40.0, interaction_sum=0.0, gradient_norm=1.0, gradient_health=1.0,
        gradient_ratio=0.5, has_vanishing=False, has_exploding=False,
    )
    row.update(kw)
    out = {}
    for k, (dtype, per_slot) in METRIC_FIELDS.items():
        v = np.asarray(row[k], dtype=np.float32 if dtype == torch.float32 else bool)
        out[k] = np.broadcast_to(v, (n_slots,)).copy() if per_slot else v
    return out


def action_row(op: Op = Op.WAIT, **heads: int) -> dict[str, int]:
    """An action (one env): defaults slot 0, CONV_LIGHT, SIGMOID_ADD, STANDARD tempo, FULL, INSTANT, LINEAR."""
    a = dict(op=int(op), slot=0, blueprint=1, style=2, tempo=1, alpha_target=2, alpha_speed=0, alpha_curve=0)
    a.update({k: int(v) for k, v in heads.items()})
    return a


# ================================================================================================
# Report
# ================================================================================================
def describe(res: ModeResult, mm: Mismatch, context: int = 3) -> str:
    """The earliest occurrence of a mismatch: its env's non-WAIT decisions and the last metrics."""
    trace = res.traces[mm.env][: mm.step + 1]
    lines = [f"  {mm.field} (env {mm.env}, after decision {mm.step}, slot {mm.slot}): ours={mm.ours} orig={mm.orig}"]
    ops = []
    for t, (a, _m) in enumerate(trace[1:], start=1):
        if a is not None and a["op"] != Op.WAIT:
            heads = {k: int(v) for k, v in a.items() if k not in ("op",)}
            ops.append(f"{t}:{Op(int(a['op'])).name}{heads}")
    lines.append("    decisions: " + ("; ".join(ops) if ops else "all WAIT"))
    s = max(mm.slot, 0)
    for t in range(max(0, mm.step - context + 1), mm.step + 1):
        m = trace[t][1]
        lines.append(
            f"    epoch {t} metrics: val_acc={float(m['val_acc']):.3f} acc_without={float(m['acc_without_slot'][s]):.3f} "
            f"health={float(m['gradient_health'][s]):.3f} ratio={float(m['gradient_ratio'][s]):.3f} "
            f"exploding={bool(m['has_exploding'][s])} interaction={float(m['interaction_sum'][s]):.3f}"
        )
    return "\n".join(lines)


def format_table(results: list[ModeResult]) -> str:
    names = sorted({f for r in results for f in r.counts})
    head = f"{'field':44s}" + "".join(f"{r.mode:>22s}" for r in results)
    lines = [head, f"{'(env-steps compared)':44s}" + "".join(f"{r.n_env_steps:>22d}" for r in results)]
    for n in names:
        lines.append(f"{n:44s}" + "".join(f"{f'{r.counts[n]} ({r.first[n]} root)':>22s}" for r in results))
    if not names:
        lines.append("(no mismatches outside SPEC §15)")
    lines.append("SPEC §15, not counted above:")
    for n in SECTION15:
        lines.append(f"  {n:42s}" + "".join(f"{r.sec15[n]:>22d}" for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--esper-src", default=None, help=f"esper-lite's src/ folder (default ${ENV_VAR})")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--slots", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="permissive,strict,auto", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--raw-cooldown", action="store_true",
                   help="let the original count cooldown epochs twice (SPEC §15 not aligned)")
    p.add_argument("--examples", action="store_true", help="print the earliest occurrence of each mismatch")
    args = p.parse_args(argv)
    o = load_original(args.esper_src)
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            p.error(f"--modes: expected names from {tuple(MODES)}, got {mode!r}")
        results.append(run_mode(o, mode, args.episodes, args.steps, args.seed, args.slots, not args.raw_cooldown))
    print(format_table(results))
    if args.examples:
        for r in results:
            if r.examples:
                print(f"\n[{r.mode}] earliest occurrence of each mismatch:")
                for name in sorted(r.examples):
                    print(describe(r, r.examples[name]))
    return 1 if any(r.counts for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
