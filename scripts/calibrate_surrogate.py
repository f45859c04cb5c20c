"""Calibrate the surrogate dynamics against the real batched hosts (issue 6).

Runs the batched-hosts backend (sklearn digits, small CNN hosts) host-only, under the heuristic
controller and under the random masked policy; fits the surrogate's host-curve ranges, noise levels
and seed-effect scale to what was recorded (``esper_soa.training.calibration``); reruns the surrogate with
the default and the fitted config under the same controllers; writes ``docs/calibration.json``
and ``docs/calibration.png`` and prints the fitted ``SurrogateConfig(...)`` literal and the
comparison tables (markdown, as used in ``docs/CALIBRATION.md``).

    python scripts/calibrate_surrogate.py [--preset calibrated] [--n-envs 64] [--max-epochs 80]

It first measures the hosts' seed headroom (``calibration.seed_headroom``: what a good seed can add
at all). Defaults take a few minutes on 2 shared CPU cores (one torch thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from esper_soa.dynamics.hosts import HOSTS_PRESETS
from esper_soa.training.calibration import (
    FITTED_FIELDS,
    config_literal,
    contribution_by_alpha,
    run_calibration,
    seed_headroom,
)
from esper_soa.training.plots import plot_calibration

ROOT = Path(__file__).resolve().parents[1]

STAT_ROWS = (
    ("final_acc_mean", "final val_acc, mean (%)"),
    ("final_acc_std", "final val_acc, std across envs (pp)"),
    ("epochs_to_90pct", "epochs to 90 % of final val_acc"),
    ("gain_over_host_only", "final val_acc - host-only final (pp)"),
    ("seeds_per_env", "seeds germinated per env"),
    ("frac_seeds_blended", "fraction of seeds that reach BLENDING"),
    ("measured_seeds_per_env", "seeds with a measured contribution per env"),
    ("frac_positive_contribution", "fraction of measured seeds with contribution > 0"),
    ("frac_zero_contribution", "fraction of measured seeds with contribution exactly 0"),
    ("mean_contribution", "mean last contribution (pp)"),
    ("mean_abs_contribution", "mean abs last contribution (pp)"),
    ("fossilized_per_env", "fossilized seeds per env at the end"),
    ("fossil_envs", "envs with a fossil at the end"),
    ("fossil_credit_minus_gain", "those envs: fossils' measured contribution - actual gain (pp)"),
)


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_tables(res: dict) -> str:
    """The fitted-vs-default and real-vs-surrogate tables of the report."""
    v, d, ci, chk = res["fitted_values"], res["default_config"], res["ci"], res["self_check"]
    lines = ["| parameter | default | fitted (real hosts) | 90 % bootstrap | refit: default surrogate "
             "| refit: fitted surrogate |", "|---|---|---|---|---|---|"]
    for k in FITTED_FIELDS:
        fit = _num(v[k]) if k in v else "(kept: too little data)"
        lo, hi = ci.get(k, (float("nan"), float("nan")))
        lines.append(f"| `{k}` | {_num(getattr(d, k))} | {fit} | {_num(lo)} - {_num(hi)} "
                     f"| {_num(chk['default'].get(k))} | {_num(chk['fitted'].get(k))} |")
    sf = res["seed_fit"]
    if sf is not None:
        for key, label in (("location_pp", "mean benefit"), ("spread_pp", "benefit spread")):
            lo, hi = ci.get(key, (math.nan, math.nan))
            lines.append(f"| ({label}, reference seed, pp) | - | {_num(sf[key])} | {_num(lo)} - {_num(hi)} | | |")
    out = "\n".join(lines) + "\n"
    stats = res["stats"]
    for ctl in [c for c in stats["real"] if c != "host_only"] + ["host_only"]:
        rows = [f"\n**{ctl}**\n", "| statistic | real hosts | surrogate default | surrogate fitted |",
                "|---|---|---|---|"]
        for key, label in STAT_ROWS:
            vals = [stats[src][ctl].get(key) for src in ("real", "surrogate_default", "surrogate_fitted")]
            if all(x is None or (isinstance(x, float) and math.isnan(x)) for x in vals):
                continue
            rows.append(f"| {label} | " + " | ".join(_num(x) for x in vals) + " |")
        out += "\n".join(rows) + "\n"
    out += "\n**every measured contribution by alpha: n / rms (pp) / fraction exactly 0**\n\n"
    out += "| run | " + " | ".join(f"alpha in ({lo:g}, {hi:g}]" for lo, hi in zip(
        res["by_alpha"]["real"]["heuristic"]["lo"], res["by_alpha"]["real"]["heuristic"]["hi"])) + " |\n"
    out += "|---|" + "---|" * len(res["by_alpha"]["real"]["heuristic"]["lo"]) + "\n"
    for src, per in res["by_alpha"].items():
        for ctl, b in per.items():
            cells = [f"{int(n)} / {_num(r)} / {_num(z)}" for n, r, z in zip(b["n"], b["rms"], b["frac_zero"])]
            out += f"| {src}, {ctl} | " + " | ".join(cells) + " |\n"
    return out


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-envs", type=int, default=64, help="real host envs per run")
    ap.add_argument("--max-epochs", type=int, default=80, help="episode length (epochs)")
    ap.add_argument("--preset", default="calibrated", choices=sorted(HOSTS_PRESETS),
                    help="hosts configuration (HOSTS_PRESETS); the flags below override its fields")
    ap.add_argument("--minibatches", type=int, default=None, help="HostsConfig.minibatches_per_epoch")
    ap.add_argument("--minibatch-size", type=int, default=None, help="HostsConfig.minibatch_size")
    ap.add_argument("--val-size", type=int, default=None, help="HostsConfig.val_size")
    ap.add_argument("--headroom-replicates", type=int, default=12,
                    help="hosts per variant in the seed-headroom measurement (0: skip it)")
    ap.add_argument("--headroom-epochs", type=int, default=60)
    ap.add_argument("--surrogate-envs", type=int, default=512, help="envs per surrogate comparison run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the intervals")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out-json", type=Path, default=ROOT / "docs" / "calibration.json")
    ap.add_argument("--out-png", type=Path, default=ROOT / "docs" / "calibration.png")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    overrides = {"minibatches_per_epoch": args.minibatches, "minibatch_size": args.minibatch_size,
                 "val_size": args.val_size}
    hcfg = dataclasses.replace(HOSTS_PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    start = time.perf_counter()
    headroom = None
    if args.headroom_replicates:
        headroom = seed_headroom(hcfg, replicates=args.headroom_replicates, epochs=args.headroom_epochs,
                                 seed=args.seed)
        print(f"seed headroom: host alone {headroom['host_alone_acc']:.2f} %, best {headroom['best']} "
              f"{headroom['best_gain_pp']:+.2f} +- {headroom['best_gain_sem_pp']:.2f} pp ({headroom['seconds']:.0f} s)")
    res = run_calibration(n_envs=args.n_envs, max_epochs=args.max_epochs, hosts_config=hcfg,
                          surrogate_envs=args.surrogate_envs, seed=args.seed, n_boot=args.n_boot)
    plot_calibration(res, str(args.out_png))
    ctls = [c for c in res["real"] if c != "host_only"]
    res["by_alpha"] = {"real": {c: contribution_by_alpha(res["real"][c]) for c in ctls},
                       "surrogate_fitted": {c: contribution_by_alpha(res["surrogate"]["fitted"][c]) for c in ctls}}
    seconds = time.perf_counter() - start

    fit = res["host_fit"]
    payload = {
        "command": " ".join(["python scripts/calibrate_surrogate.py", *sys.argv[1:]]),
        "seconds_total": seconds,
        "seconds_real_runs": {k: t.seconds for k, t in res["real"].items()},
        "torch_threads": args.threads,
        "sizes": {"n_envs": args.n_envs, "max_epochs": args.max_epochs, "surrogate_envs": args.surrogate_envs,
                  "seed": args.seed, "n_slots": 3, "topology": "cnn"},
        "hosts_config": _jsonable(res["hosts_config"]),
        "fitted": res["fitted_values"],
        "fitted_literal": config_literal(res["fitted_values"]),
        "default": {k: getattr(res["default_config"], k) for k in FITTED_FIELDS},
        "bootstrap_90": res["ci"],
        "seed_fit": res["seed_fit"],
        "seed_fit_per_controller": res["seed_fit_per_controller"],
        "contribution_noise": res["contribution_noise"],
        "self_check": res["self_check"],
        "host_fit_per_env": {"acc0": fit.acc0, "acc_max": fit.acc_max, "tau": fit.tau,
                             "resid_std": fit.resid_std},
        "stats": res["stats"],
        "contribution_by_alpha": res["by_alpha"],
        "preset": args.preset,
        "seed_headroom": headroom,
    }
    args.out_json.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    print(f"\n# {seconds:.0f} s in all; wrote {args.out_json} and {args.out_png}\n")
    print(config_literal(res["fitted_values"]))
    print()
    print(markdown_tables(res))


if __name__ == "__main__":
    main()
