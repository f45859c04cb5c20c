"""Shared test fixtures: random and hand-set metric inputs, random and hand-set actions."""

from __future__ import annotations

import numpy as np
import torch

from esper_soa.core.masks import head_views
from esper_soa.core.spec import (
    HEAD_NAMES,
    METRIC_FIELDS,
    AlphaCurve,
    Blueprint,
    Op,
    Style,
    head_sizes,
    mask_width,
)
from esper_soa.dynamics.synthetic import synthetic_metrics, weighted_masked_action


def random_metrics(
    rng: np.random.Generator, n_envs: int, n_slots: int, p_diverged: float = 0.0
) -> dict[str, torch.Tensor]:
    """Metrics shaped like a backend's, with values that exercise every gate both ways; a host
    diverges with probability ``p_diverged`` per env."""
    acc = rng.uniform(40, 90, n_envs)
    m = synthetic_metrics(rng, acc, n_slots, host_params=(150.0, 5000.0, 250000.0), spread=2.0, p_diverged=p_diverged)
    return {k: torch.as_tensor(v, dtype=METRIC_FIELDS[k][0]) for k, v in m.items()}


# Op preference for mask-respecting draws: WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE,
# ADVANCE. Progress-biased so seeds regularly reach BLENDING, HOLDING and FOSSILIZED.
OP_WEIGHTS = np.array([1.0, 2.0, 0.7, 0.15, 3.0, 3.0])


def random_action(
    rng: np.random.Generator, masks: dict[str, torch.Tensor], n_slots: int, p_arbitrary: float = 0.1
) -> dict[str, torch.Tensor]:
    """Mostly mask-respecting actions (an allowed op drawn by ``OP_WEIGHTS``, then an allowed
    slot), with probability ``p_arbitrary`` per env an arbitrary one, out-of-range included."""
    sizes = head_sizes(n_slots)
    n_envs = masks["head"].shape[0]
    out = {k: np.zeros(n_envs, dtype=np.int64) for k in HEAD_NAMES}
    np_masks = {k: v.cpu().numpy() for k, v in {**head_views(masks), "slot_by_op": masks["slot_by_op"]}.items()}
    for e in range(n_envs):
        if rng.random() < p_arbitrary:
            for k in HEAD_NAMES:
                out[k][e] = rng.integers(-1, sizes[k] + 1)
            continue
        for k, v in weighted_masked_action(rng, np_masks, e, OP_WEIGHTS).items():
            out[k][e] = v
    return {k: torch.as_tensor(v) for k, v in out.items()}


def to_numpy(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors to numpy arrays, nested dicts (the state's ``slots``) included."""
    return {k: to_numpy(v) if isinstance(v, dict) else v.cpu().numpy() for k, v in d.items()}


# head indices used by the hand-written sequences
TEMPO_STANDARD = 1  # 5 epochs
TARGET_HALF, TARGET_FULL = 0, 2
SPEED_INSTANT, SPEED_FAST, SPEED_MEDIUM = 0, 1, 2


def make_metrics(
    n_envs: int,
    n_slots: int,
    val_acc: float = 50.0,
    val_loss: float = 1.0,
    acc_all_seeds_off: float | None = None,
    acc_committed: float | None = None,
    host_params: float = 1e5,
    acc_without_slot: float | None = None,
    interaction_sum: float = 0.0,
    gradient_health: float = 1.0,
    gradient_ratio: float = 0.5,
    has_exploding: bool = False,
) -> dict[str, np.ndarray]:
    """Metrics of METRIC_FIELDS; by default no seed changes the accuracy."""
    env = lambda v, dt=np.float32: np.full(n_envs, v, dtype=dt)  # noqa: E731
    slot = lambda v, dt=np.float32: np.full((n_envs, n_slots), v, dtype=dt)  # noqa: E731
    return {
        "val_loss": env(val_loss),
        "val_acc": env(val_acc),
        "acc_all_seeds_off": env(val_acc if acc_all_seeds_off is None else acc_all_seeds_off),
        "acc_committed": env(val_acc if acc_committed is None else acc_committed),
        "host_params": env(host_params),
        "diverged": env(False, bool),
        "acc_without_slot": slot(val_acc if acc_without_slot is None else acc_without_slot),
        "interaction_sum": slot(interaction_sum),
        "gradient_norm": slot(1.0),
        "gradient_health": slot(gradient_health),
        "gradient_ratio": slot(gradient_ratio),
        "has_vanishing": slot(False, bool),
        "has_exploding": slot(has_exploding, bool),
    }


def make_actions(n_envs: int = 1, **heads: int) -> dict[str, np.ndarray]:
    defaults = dict(
        op=Op.WAIT,
        slot=0,
        blueprint=Blueprint.CONV_LIGHT,
        style=Style.SIGMOID_ADD,
        tempo=TEMPO_STANDARD,
        alpha_target=TARGET_FULL,
        alpha_speed=SPEED_INSTANT,
        alpha_curve=AlphaCurve.LINEAR,
    )
    defaults.update(heads)
    return {h: np.full(n_envs, int(defaults[h]), dtype=np.int64) for h in HEAD_NAMES}


def pack_masks(per_head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hand-written per-head masks (``op``, ``blueprint``, ..., ``slot_by_op``) in the engine's layout:
    ``head`` ``[..., 8, K]`` (padding False, the slot row the union over ops) and ``slot_by_op``."""
    by_op = per_head["slot_by_op"]
    rows = {**per_head, "slot": by_op.any(-2)}
    head = torch.zeros(*by_op.shape[:-2], len(HEAD_NAMES), mask_width(by_op.shape[-1]), dtype=torch.bool)
    for h, name in enumerate(HEAD_NAMES):
        head[..., h, : rows[name].shape[-1]] = rows[name]
    return {"head": head, "slot_by_op": by_op}
