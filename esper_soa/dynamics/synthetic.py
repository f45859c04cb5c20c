"""Synthetic step inputs for tests and parity scripts: backend metrics and mask-respecting actions.

A differential test or a comparison with the original needs identical metric inputs on both
sides, with values that exercise every gate both ways (gradient health and ratio around their
thresholds, counterfactuals of either sign, occasional vanishing/exploding flags), and random
mask-respecting actions biased towards progress. Shared by ``tests/helpers.py`` and
``scripts/compare_original.py``; no engine uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from esper_soa.core.spec import HEAD_NAMES, METRIC_FIELDS


def synthetic_metrics(
    rng: np.random.Generator,
    acc: np.ndarray,
    n_slots: int,
    host_params: float | Sequence[float],
    spread: float,
    p_diverged: float = 0.0,
) -> dict[str, np.ndarray]:
    """One epoch's metrics for ``len(acc)`` envs whose host accuracy is ``acc``.

    ``host_params``: one value for every env, or choices drawn per env. ``spread``: std of the
    seeds-off and slot-off accuracy drops. Float fields come back as float32, the precision the
    engine's state stores, so every consumer sees exactly the same values. A host diverges with
    probability ``p_diverged`` per env (0: none, and no random draw for it).
    """
    n_envs = len(acc)
    shape = (n_envs, n_slots)
    m = {
        "val_loss": rng.uniform(0.1, 3.0, n_envs),
        "val_acc": acc,
        "acc_all_seeds_off": acc - rng.normal(0.3, spread, n_envs),
        "acc_committed": acc - rng.normal(0.2, 1.0, n_envs),
        "host_params": (np.full(n_envs, float(host_params)) if np.isscalar(host_params)
                        else rng.choice(np.asarray(host_params, dtype=np.float64), n_envs)),
        "diverged": rng.random(n_envs) < p_diverged if p_diverged > 0 else np.zeros(n_envs, dtype=bool),
        "acc_without_slot": acc[:, None] - rng.normal(0.5, spread, shape),
        "interaction_sum": rng.normal(0.0, 1.0, shape),
        "gradient_norm": rng.lognormal(0.0, 1.0, shape),
        "gradient_health": rng.uniform(0.4, 1.0, shape),
        "gradient_ratio": rng.uniform(0.0, 0.4, shape),
        "has_vanishing": rng.random(shape) < 0.1,
        "has_exploding": rng.random(shape) < 0.1,
    }
    return {k: np.asarray(v, dtype=np.float32) if METRIC_FIELDS[k][0] == torch.float32 else v for k, v in m.items()}


def weighted_masked_action(
    rng: np.random.Generator, masks: dict[str, np.ndarray], env: int, op_weights: np.ndarray
) -> dict[str, int]:
    """Env ``env``'s head values: an op the masks allow, drawn with ``op_weights``; a slot that op
    allows; every other head uniform over its mask (numpy masks, ``[E, ...]``)."""
    w = op_weights * masks["op"][env]
    op = rng.choice(len(w), p=w / w.sum())
    row = {"op": op, "slot": rng.choice(np.flatnonzero(masks["slot_by_op"][env, op]))}
    for k in HEAD_NAMES[2:]:
        row[k] = rng.choice(np.flatnonzero(masks[k][env]))
    return row
