"""Shared test fixtures: random metric inputs and mask-respecting / arbitrary random actions."""

from __future__ import annotations

import numpy as np
import torch

from esper_soa.dynamics.base import METRIC_FIELDS
from esper_soa.spec import HEAD_NAMES, head_sizes


def random_metrics(rng: np.random.Generator, n_envs: int, n_slots: int) -> dict[str, torch.Tensor]:
    """Metrics shaped like a backend's, with values that exercise every gate both ways."""
    acc = rng.uniform(40, 90, n_envs)
    m = {
        "val_loss": rng.uniform(0.1, 3.0, n_envs),
        "val_acc": acc,
        "acc_all_seeds_off": acc - rng.normal(0.3, 2.0, n_envs),
        "acc_committed": acc - rng.normal(0.2, 1.0, n_envs),
        "host_params": rng.choice([150.0, 5000.0, 250000.0], n_envs),
        "diverged": np.zeros(n_envs, dtype=bool),
        "acc_without_slot": acc[:, None] - rng.normal(0.5, 2.0, (n_envs, n_slots)),
        "interaction_sum": rng.normal(0.0, 1.0, (n_envs, n_slots)),
        "gradient_norm": rng.lognormal(0.0, 1.0, (n_envs, n_slots)),
        "gradient_health": rng.uniform(0.4, 1.0, (n_envs, n_slots)),
        "gradient_ratio": rng.uniform(0.0, 0.4, (n_envs, n_slots)),
        "has_vanishing": rng.random((n_envs, n_slots)) < 0.1,
        "has_exploding": rng.random((n_envs, n_slots)) < 0.1,
    }
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
    n_envs = masks["op"].shape[0]
    out = {k: np.zeros(n_envs, dtype=np.int64) for k in HEAD_NAMES}
    np_masks = {k: v.cpu().numpy() for k, v in masks.items()}
    for e in range(n_envs):
        if rng.random() < p_arbitrary:
            for k in HEAD_NAMES:
                out[k][e] = rng.integers(-1, sizes[k] + 1)
            continue
        weights = OP_WEIGHTS * np_masks["op"][e]
        op = rng.choice(len(weights), p=weights / weights.sum())
        out["op"][e] = op
        out["slot"][e] = rng.choice(np.flatnonzero(np_masks["slot_by_op"][e, op]))
        for k in HEAD_NAMES[2:]:
            out[k][e] = rng.choice(np.flatnonzero(np_masks[k][e]))
    return {k: torch.as_tensor(v) for k, v in out.items()}


def to_numpy(d: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors to numpy arrays, nested dicts (the state's ``slots``) included."""
    return {k: to_numpy(v) if isinstance(v, dict) else v.cpu().numpy() for k, v in d.items()}
