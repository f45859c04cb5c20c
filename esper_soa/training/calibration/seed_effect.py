"""Seed-effect fits (``benefit_pp``, ``benefit_std``, ``cf_noise_std``) through the surrogate's own
measurement model, and the summary statistics that compare real and surrogate runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import LIVE_STAGES, AlphaAlgorithm, Stage
from esper_soa.dynamics.surrogate import SurrogateConfig, SurrogateDynamics
from esper_soa.training.calibration.collect import Trajectories

LIVE_CODES = tuple(int(s) for s in LIVE_STAGES)
TRAIN_CODES = tuple(int(s) for s in (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING))
SEED_EFFECT_FIELDS = ("benefit_pp", "benefit_std")


@dataclass
class SeedObservations:
    """One row per seed: its last usable measured contribution and the surrogate model's terms.

    Under the surrogate's ADD model ``residual = contribution - interaction_sum - compensation =
    den * benefit_pp * (prior_mean + benefit_std * z) + noise`` with ``den = alpha * size *
    learned`` (``noise ~ N(0, cf_noise_std)``).
    """

    residual: np.ndarray
    prior_mean: np.ndarray  # blueprint_benefit_mean of the seed's blueprint
    den: np.ndarray
    contribution: np.ndarray  # the raw measured contribution, pp
    env: np.ndarray
    slot: np.ndarray
    blueprint: np.ndarray

    def __len__(self) -> int:
        return len(self.residual)


def concat_observations(parts: list[SeedObservations]) -> SeedObservations:
    """Pool the observations of several runs (e.g. both controllers)."""
    return SeedObservations(*(np.concatenate([getattr(p, f.name) for p in parts])
                              for f in dataclasses.fields(SeedObservations)))


def size_table(scfg: SurrogateConfig, n_slots: int, topology: str = "cnn") -> np.ndarray:
    """``[S, 13]`` size factors the surrogate uses (its own spec slot widths, not the hosts')."""
    dyn = SurrogateDynamics(EngineConfig(n_envs=1, n_slots=n_slots, topology=topology), scfg)
    return dyn.size_scale.numpy().astype(float)


def replay_model_terms(traj: Trajectories, scfg: SurrogateConfig, topology: str = "cnn") -> dict[str, np.ndarray]:
    """The surrogate's ``learned``, co-adaptation ``compensation`` and ``size`` ``[E, T+1, S]`` for
    the recorded stage/alpha history: the same recursions as ``SurrogateDynamics.advance``, so the
    seed-effect fit sees real data through exactly the surrogate's measurement model."""
    sizes = size_table(scfg, traj.stage.shape[2], topology)
    stage, alpha, bp = traj.stage, traj.alpha, traj.blueprint
    live = np.isin(stage, LIVE_CODES)
    trains = np.isin(stage, TRAIN_CODES)
    a = np.where(live & (alpha > 0), alpha, 0.0)
    size = sizes[np.arange(stage.shape[2])[None, None, :], np.clip(bp, 0, sizes.shape[1] - 1)]
    progress = np.zeros(stage.shape)
    comp = np.zeros(stage.shape)
    p = np.zeros(stage.shape[::2])
    co = np.zeros(stage.shape[::2])
    for t in range(stage.shape[1]):
        p = np.where(trains[:, t], p + 1.0, np.where(live[:, t], p, 0.0))
        target = a[:, t] * size[:, t] * scfg.coadapt_pp
        co = np.where(live[:, t], co + scfg.coadapt_rate * (target - co), 0.0)
        progress[:, t] = p
        comp[:, t] = np.minimum(co, target)
    learned = 1.0 - np.exp(-progress / scfg.seed_learn_tau)
    return {"learned": learned, "compensation": comp, "size": size, "alpha": a}


def seed_ids(traj: Trajectories) -> np.ndarray:
    """``[E, T+1, S]`` seed index (0, 1, ... per env and slot) while a slot is live, else -1."""
    live = np.isin(traj.stage, LIVE_CODES)
    ids = np.full(live.shape, -1, dtype=np.int64)
    count = np.zeros(live.shape[::2], dtype=np.int64)
    prev = np.zeros(live.shape[::2], dtype=bool)
    prev_germ = np.full(live.shape[::2], -1, dtype=np.int64)
    for t in range(live.shape[1]):
        now = live[:, t]
        germ = traj.germination_epoch[:, t]
        new = now & (~prev | (germ != prev_germ))
        count = count + new
        ids[:, t] = np.where(now, count - 1, -1)
        prev, prev_germ = now, np.where(now, germ, -1)
    return ids


def seed_observations(traj: Trajectories, scfg: SurrogateConfig, topology: str = "cnn",
                      min_den: float = 0.05) -> SeedObservations:
    """Each seed's last measured ADD contribution with ``alpha * size * learned >= min_den``, with
    the surrogate's model terms replayed under ``scfg``. MULTIPLY and GATE seeds are left out: their
    effect is not linear in the benefit (GATE is not even invertible)."""
    terms = replay_model_terms(traj, scfg, topology)
    den = terms["alpha"] * terms["size"] * terms["learned"]
    ids = seed_ids(traj)
    ok = np.isfinite(traj.contribution) & (traj.algorithm == int(AlphaAlgorithm.ADD)) & (den >= min_den)
    # HOLDING measurements are left out: a controller stops measuring a seed (FOSSILIZE) when a
    # measurement clears its bar, so the last one there is selected by its own noise
    ok &= (ids >= 0) & (traj.stage != int(Stage.HOLDING))
    means = np.asarray(scfg.blueprint_benefit_mean, dtype=float)
    rows: dict[tuple[int, int, int], int] = {}
    for e, t, s in zip(*np.nonzero(ok)):  # later epochs overwrite: the last observation wins
        rows[(int(e), int(s), int(ids[e, t, s]))] = int(t)
    sel = [(e, t, s) for (e, s, _), t in sorted(rows.items())]
    if not sel:
        f, i = np.zeros(0), np.zeros(0, dtype=np.int64)
        return SeedObservations(f, f, f, f, i, i, i)
    e_i, t_i, s_i = (np.array(v, dtype=np.int64) for v in zip(*sel))
    c = traj.contribution[e_i, t_i, s_i]
    r = c - traj.interaction_sum[e_i, t_i, s_i] - terms["compensation"][e_i, t_i, s_i]
    bp = traj.blueprint[e_i, t_i, s_i]
    return SeedObservations(residual=r, prior_mean=means[bp], den=den[e_i, t_i, s_i], contribution=c,
                            env=e_i, slot=s_i, blueprint=bp)


def contribution_noise_pairs(traj: Trajectories, scfg: SurrogateConfig, topology: str = "cnn",
                             min_den: float = 0.05) -> np.ndarray:
    """Normalised differences of consecutive measurements of the same ADD seed (one per pair).

    In the surrogate ``b_t = residual_t / den_t = benefit + noise_t / den_t`` (the learning,
    compensation and interaction terms are replayed or measured), so ``(b_t - b_{t-1}) /
    sqrt(1 / den_t^2 + 1 / den_{t-1}^2)`` is ``N(0, cf_noise_std^2)`` whatever alpha does: the
    blending ramps count, not only epochs at equal alpha.
    """
    terms = replay_model_terms(traj, scfg, topology)
    den = terms["alpha"] * terms["size"] * terms["learned"]
    ok = (np.isfinite(traj.contribution) & (traj.algorithm == int(AlphaAlgorithm.ADD)) & (den >= min_den))
    safe = np.where(ok, den, 1.0)
    b = np.where(ok, (traj.contribution - traj.interaction_sum - terms["compensation"]) / safe, 0.0)
    ids = seed_ids(traj)
    pair = ok[:, 1:] & ok[:, :-1] & (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    scale = np.sqrt(1.0 / safe[:, 1:] ** 2 + 1.0 / safe[:, :-1] ** 2)
    return ((b[:, 1:] - b[:, :-1]) / scale)[pair]


def noise_from_pairs(d: np.ndarray) -> float:
    """``cf_noise_std`` estimate from :func:`contribution_noise_pairs` (NaN without pairs)."""
    return float(np.sqrt(np.mean(d * d))) if len(d) else float("nan")


def fit_seed_effect(obs: SeedObservations, noise_std: float = 0.0) -> dict[str, float]:
    """``benefit_pp`` and ``benefit_std`` from measured ADD contributions (method of moments).

    ``residual = benefit_pp * den * m + den * spread * z + noise`` with ``spread = benefit_pp *
    benefit_std``: ``benefit_pp`` is the least-squares slope of the residual on ``den * m``
    (through the origin, unbiased whatever the heteroscedasticity), and ``spread^2`` the
    least-squares fit of the squared fit residuals minus ``noise_std^2`` on ``den^2``.
    Also returned: ``location_pp`` (the mean benefit of a fully learnt, reference-size seed, all
    blueprints pooled), ``spread_pp`` and the number of seeds. When the slope is not positive the
    surrogate (positive blueprint means times ``benefit_pp >= 0``) cannot represent the data; then
    ``benefit_pp`` is the spread, ``benefit_std`` 1 and ``representable`` 0.
    """
    n = len(obs)
    if n < 3:
        raise ValueError(f"fit_seed_effect: need at least 3 seed observations, got {n}")
    r, d, m = obs.residual, obs.den, obs.prior_mean
    x = d * m
    slope = float((r * x).sum() / (x * x).sum())
    res = r - slope * x
    spread = math.sqrt(max(float((d * d * (res * res - noise_std ** 2)).sum() / (d ** 4).sum()), 0.0))
    ok = slope > 0
    return {
        "benefit_pp": slope if ok else spread,
        "benefit_std": spread / slope if ok else 1.0,
        "location_pp": float((r * d).sum() / (d * d).sum()),
        "spread_pp": spread,
        "n_seeds": float(n),
        "representable": float(ok),
    }


# ----------------------------------------------------------------------------- comparison
def seed_last_contributions(traj: Trajectories) -> np.ndarray:
    """Each seed's last measured contribution (seeds never measured are left out), pp."""
    ids = seed_ids(traj)
    ok = np.isfinite(traj.contribution) & (ids >= 0)
    last: dict[tuple[int, int, int], float] = {}
    for e, t, s in zip(*np.nonzero(ok)):
        last[(int(e), int(s), int(ids[e, t, s]))] = float(traj.contribution[e, t, s])
    return np.array([last[k] for k in sorted(last)], dtype=float)


def contribution_by_alpha(traj: Trajectories, edges: tuple[float, ...] = (0.0, 0.2, 0.4, 0.7, 1.0)
                          ) -> dict[str, list[float]]:
    """Every measured contribution, binned by the seed's alpha: count, rms and fraction exactly 0.

    Why: the surrogate's counterfactual noise is additive and the same at any alpha; on the real
    hosts a barely blended seed changes no prediction at all, so the spread grows with alpha.
    """
    ok = np.isfinite(traj.contribution)
    a, c = traj.alpha[ok], traj.contribution[ok]
    out: dict[str, list[float]] = {"lo": [], "hi": [], "n": [], "rms": [], "frac_zero": [], "mean": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (a > lo) & (a <= hi + 1e-6)
        out["lo"].append(lo)
        out["hi"].append(hi)
        out["n"].append(float(m.sum()))
        out["rms"].append(float(np.sqrt(np.mean(c[m] ** 2))) if m.any() else float("nan"))
        out["frac_zero"].append(float((c[m] == 0).mean()) if m.any() else float("nan"))
        out["mean"].append(float(c[m].mean()) if m.any() else float("nan"))
    return out


def epochs_to_fraction(acc: np.ndarray, frac: float = 0.9) -> np.ndarray:
    """Per env, the first epoch whose val_acc reaches ``frac`` of the final one."""
    reached = acc >= frac * acc[:, -1:]
    return reached.argmax(1).astype(float)


def summary_stats(traj: Trajectories, host_only: Trajectories | None = None) -> dict[str, float]:
    """The numbers the calibration report compares between real and surrogate runs."""
    final = traj.val_acc[:, -1]
    ids = seed_ids(traj)
    n_seeds = _count_seeds(ids)
    blended = np.isin(traj.stage, [int(Stage.BLENDING), int(Stage.HOLDING), int(Stage.FOSSILIZED)])
    n_blended = _count_seeds(np.where(blended, ids, -1)) if n_seeds else 0
    c = seed_last_contributions(traj)
    out = {
        "n_envs": float(traj.n_envs),
        "final_acc_mean": float(final.mean()),
        "final_acc_std": float(final.std(ddof=1)) if traj.n_envs > 1 else 0.0,
        "epochs_to_90pct": float(epochs_to_fraction(traj.val_acc).mean()),
        "seeds_per_env": n_seeds / traj.n_envs,
        "frac_seeds_blended": n_blended / n_seeds if n_seeds else float("nan"),
        "measured_seeds_per_env": len(c) / traj.n_envs,
        "frac_positive_contribution": float((c > 0).mean()) if len(c) else float("nan"),
        "frac_zero_contribution": float((c == 0).mean()) if len(c) else float("nan"),
        "mean_abs_contribution": float(np.abs(c).mean()) if len(c) else float("nan"),
        "mean_contribution": float(c.mean()) if len(c) else float("nan"),
        "fossilized_per_env": float((traj.stage[:, -1] == int(Stage.FOSSILIZED)).sum() / traj.n_envs),
    }
    if host_only is not None:
        gain = final - host_only.val_acc[:, -1]
        out["gain_over_host_only"] = float(gain.mean())
        # co-adaptation: what the leave-one-out measurement credits the fossils with, minus what
        # they actually added (the env's own host-only run is the counterfactual); n = such envs
        fos = traj.stage[:, -1] == int(Stage.FOSSILIZED)
        credited = np.where(fos & np.isfinite(traj.contribution[:, -1]), traj.contribution[:, -1], 0.0).sum(1)
        has = fos.any(1)
        out["fossil_envs"] = float(has.sum())
        out["fossil_credit_minus_gain"] = float((credited - gain)[has].mean()) if has.any() else float("nan")
    return out


def _count_seeds(ids: np.ndarray) -> int:
    """Number of distinct (env, slot, seed index) triples among the entries >= 0."""
    e, t, s = np.nonzero(ids >= 0)
    return len(set(zip(e.tolist(), s.tolist(), ids[e, t, s].tolist())))


