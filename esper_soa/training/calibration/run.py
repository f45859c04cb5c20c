"""Orchestration: every fit over a set of runs (with bootstrap intervals), the fitted config, the
whole real-vs-surrogate calibration, and the hosts' seed headroom.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import AlphaAlgorithm, Blueprint, Stage
from esper_soa.dynamics.surrogate import SurrogateConfig
from esper_soa.training.calibration.collect import Trajectories, collect_trajectories
from esper_soa.training.calibration.host_curve import (
    HOST_CURVE_FIELDS,
    HostCurveFit,
    eval_noise,
    fit_host_curves,
    host_curve_ranges,
)
from esper_soa.training.calibration.seed_effect import (
    SEED_EFFECT_FIELDS,
    SeedObservations,
    concat_observations,
    contribution_noise_pairs,
    fit_seed_effect,
    noise_from_pairs,
    seed_observations,
    summary_stats,
)

FITTED_FIELDS = HOST_CURVE_FIELDS + ("eval_noise_std", "cf_noise_std") + SEED_EFFECT_FIELDS


def fitted_config(values: dict[str, float], base: SurrogateConfig | None = None) -> SurrogateConfig:
    """``base`` (default: the defaults) with the fitted fields replaced."""
    base = base if base is not None else SurrogateConfig()
    return dataclasses.replace(base, **{k: float(values[k]) for k in FITTED_FIELDS if k in values})


def config_literal(values: dict[str, float], digits: int = 3) -> str:
    """A ``SurrogateConfig(...)`` literal of the fitted fields (the rest keep their defaults)."""
    args = ",\n".join(f"    {k}={round(float(values[k]), digits)!r}" for k in FITTED_FIELDS if k in values)
    return f"SurrogateConfig(\n{args},\n)"


def bootstrap(n: int, stat: Any, n_boot: int = 200, seed: int = 0, q: tuple[float, float] = (5.0, 95.0)
              ) -> dict[str, tuple[float, float]]:
    """Percentile interval of every entry of ``stat(indices)`` over ``n_boot`` resamples of ``n``
    items: how much the fit would move with other envs/seeds of the same size."""
    gen = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        try:
            out = stat(gen.integers(0, n, n))
        except ValueError:  # a resample too small to fit
            continue
        for k, v in out.items():
            draws.setdefault(k, []).append(float(v))
    return {k: (float(np.percentile(v, q[0])), float(np.percentile(v, q[1]))) for k, v in draws.items()}


def _take_fit(fit: HostCurveFit, idx: np.ndarray) -> HostCurveFit:
    return HostCurveFit(fit.acc0[idx], fit.acc_max[idx], fit.tau[idx], fit.resid_std[idx])


def _take_obs(obs: SeedObservations, idx: np.ndarray) -> SeedObservations:
    return SeedObservations(*(getattr(obs, f.name)[idx] for f in dataclasses.fields(SeedObservations)))


def fit_all(runs: dict[str, Trajectories], base: SurrogateConfig, topology: str = "cnn",
            min_pairs: int = 10, n_boot: int = 200) -> tuple[dict[str, float], dict[str, Any]]:
    """Every fit on one set of runs (``host_only`` plus controller runs of one backend).

    Returns the fitted :data:`FITTED_FIELDS` and the details (per-env host fits, seed
    observations, per-controller seed fits, bootstrap intervals). ``cf_noise_std`` keeps ``base``'s
    value when fewer than ``min_pairs`` consecutive-measurement pairs exist, and is then not
    reported as fitted.
    """
    host = runs["host_only"]
    host_fit = fit_host_curves(host.val_acc)
    values = host_curve_ranges(host_fit)
    values["eval_noise_std"] = eval_noise(host.val_acc, host_fit)
    controllers = [c for c in runs if c != "host_only"]
    pairs = {c: contribution_noise_pairs(runs[c], base, topology) for c in controllers}
    all_pairs = np.concatenate(list(pairs.values())) if pairs else np.zeros(0)
    n_pairs = len(all_pairs)
    cf = noise_from_pairs(all_pairs)
    cf_used = cf if n_pairs >= min_pairs else base.cf_noise_std
    if n_pairs >= min_pairs:
        values["cf_noise_std"] = cf
    obs = {c: seed_observations(runs[c], base, topology) for c in controllers}
    pooled = concat_observations(list(obs.values()))
    seed_fit = fit_seed_effect(pooled, cf_used) if len(pooled) >= 3 else None
    if seed_fit is not None:  # otherwise base's seed-effect values stay (too few measured seeds)
        values.update({k: seed_fit[k] for k in SEED_EFFECT_FIELDS})
    per_controller = {c: fit_seed_effect(o, cf_used) if len(o) >= 3 else None for c, o in obs.items()}

    def host_stat(idx: np.ndarray) -> dict[str, float]:
        sub = _take_fit(host_fit, idx)
        return {**host_curve_ranges(sub), "eval_noise_std": eval_noise(host.val_acc[idx], sub)}

    ci = bootstrap(host.n_envs, host_stat, n_boot)
    if n_pairs >= min_pairs:
        ci.update(bootstrap(n_pairs, lambda idx: {"cf_noise_std": noise_from_pairs(all_pairs[idx])}, n_boot))
    if seed_fit is not None:
        ci.update(bootstrap(len(pooled), lambda idx: fit_seed_effect(_take_obs(pooled, idx), cf_used), n_boot))
    details = {
        "host_fit": host_fit,
        "seed_observations": pooled,
        "seed_fit": seed_fit,
        "seed_fit_per_controller": per_controller,
        "contribution_noise": {c: {"std": noise_from_pairs(d), "pairs": len(d)} for c, d in pairs.items()},
        "cf_noise_pooled": cf,
        "cf_noise_pairs": n_pairs,
        "ci": ci,
    }
    return values, details


def run_calibration(
    n_envs: int = 64,
    max_epochs: int = 80,
    hosts_config: Any = None,
    surrogate_envs: int = 512,
    seed: int = 0,
    controllers: tuple[str, ...] = ("heuristic", "random"),
    n_boot: int = 200,
    log: Any = print,
) -> dict[str, Any]:
    """Real runs (host-only + ``controllers``), every fit, then surrogate runs with the default and
    the fitted config under the same controllers, their summary statistics, and the same fits
    applied to the surrogate runs (``self_check``: the pipeline should return the config it ran)."""
    from esper_soa.dynamics.hosts import HostsConfig

    hcfg = hosts_config if hosts_config is not None else HostsConfig()
    base = SurrogateConfig()
    names = ("host_only",) + tuple(c for c in controllers if c != "host_only")
    real_cfg = EngineConfig(n_envs=n_envs, n_slots=3, max_epochs=max_epochs, dynamics="hosts",
                            dynamics_config=hcfg, seed=seed)
    real = {}
    for name in names:
        real[name] = collect_trajectories(real_cfg, name, seed)
        log(f"real hosts, {name}: {real[name].seconds:.1f} s")
    values, details = fit_all(real, base, n_boot=n_boot)
    fitted = fitted_config(values, base)
    surrogate: dict[str, dict[str, Trajectories]] = {}
    self_check: dict[str, dict[str, float]] = {}
    for label, scfg in (("default", base), ("fitted", fitted)):
        cfg = dataclasses.replace(real_cfg, n_envs=surrogate_envs, dynamics="surrogate", dynamics_config=scfg)
        surrogate[label] = {name: collect_trajectories(cfg, name, seed) for name in names}
        log(f"surrogate {label}: {sum(t.seconds for t in surrogate[label].values()):.1f} s")
        self_check[label] = fit_all(surrogate[label], scfg, n_boot=0)[0]
    stats = {"real": {c: summary_stats(real[c], real["host_only"]) for c in names}}
    for label, trajs in surrogate.items():
        stats[f"surrogate_{label}"] = {c: summary_stats(trajs[c], trajs["host_only"]) for c in names}
    return {
        "real": real,
        "surrogate": surrogate,
        "fitted_values": values,
        "fitted_config": fitted,
        "default_config": base,
        "stats": stats,
        "self_check": self_check,
        "hosts_config": hcfg,
        **details,
    }


# ----------------------------------------------------------------------------- seed headroom
def seed_headroom(hosts_config: Any, replicates: int = 6, epochs: int = 30, seed: int = 0,
                  tail: int = 5) -> dict[str, Any]:
    """How much a seed can add on the real hosts: every (slot, cnn blueprint) held at alpha 1
    (HOLDING: seed and host train together from the first epoch) against the host alone.

    Each replicate is one host (one env key: initial weights and data order) run once per variant
    side by side in one batched backend, so each gain is paired: ``acc(variant) - acc(host
    alone)``, both averaged over the last ``tail`` epochs (the plateau, less evaluation noise).
    Returns per-variant mean gain and its standard error over replicates (pp), and the best one.
    Why: on a host that already solves its task alone, no controller can show a seed's value,
    so the calibrated hosts configuration is chosen where this headroom is >= 1 pp.
    """
    from esper_soa.core.rng import episode_seed
    from esper_soa.core.state import make_state
    from esper_soa.dynamics.hosts import CNN_BLUEPRINTS, BatchedHostsDynamics

    variants = [None] + [(s, bp) for s in range(3) for bp in CNN_BLUEPRINTS]
    n_var = len(variants)
    n = replicates * n_var
    cfg = EngineConfig(n_envs=n, n_slots=3, max_epochs=epochs, dynamics="hosts", dynamics_config=hosts_config)
    dyn = BatchedHostsDynamics(cfg, hosts_config)
    state = make_state(cfg).to_dict()
    sl = state["slots"]
    for v, var in enumerate(variants):
        if var is None:
            continue
        s, bp = var
        envs = torch.arange(v, n, n_var)  # env index = replicate * n_var + variant
        sl["stage"][envs, s] = int(Stage.HOLDING)
        sl["blueprint"][envs, s] = int(bp)
        sl["algorithm"][envs, s] = int(AlphaAlgorithm.ADD)
        sl["alpha"][envs, s] = 1.0
    replicate = torch.arange(n) // n_var
    aux = dyn.reset_aux(dyn.init_aux(n, seed), torch.ones(n, dtype=torch.bool),
                        episode_seed(seed, replicate, torch.zeros_like(replicate)))
    accs = []
    start = time.perf_counter()
    for _ in range(epochs):
        metrics, aux = dyn.advance(state, aux)
        accs.append(metrics["val_acc"])
    acc = torch.stack(accs[-tail:]).mean(0).view(replicates, n_var).double()
    gain = acc[:, 1:] - acc[:, :1]
    mean = gain.mean(0)
    sem = gain.std(0) / math.sqrt(replicates)  # NaN for one replicate
    names = [f"slot{s}.{Blueprint(bp).name}" for s, bp in variants[1:]]
    best = int(mean.argmax())
    return {
        "host_alone_acc": float(acc[:, 0].mean()),
        "gain_pp": dict(zip(names, mean.tolist())),
        "gain_sem_pp": dict(zip(names, sem.tolist())),
        "best": names[best], "best_gain_pp": float(mean[best]), "best_gain_sem_pp": float(sem[best]),
        "replicates": replicates, "epochs": epochs, "seconds": time.perf_counter() - start,
    }
