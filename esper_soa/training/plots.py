"""PNGs of a training run (``esper-soa plot RUN``; also written at the end of ``train --log-dir``).

- ``learning_curves.png``: the metrics the trainer logged through TorchRL's CSV logger
  (``RUN/metrics/scalars/<name>.csv``, one ``frames,value`` row per update) against frames:
  episode return, the committed objective J and committed accuracy (when the run logged them),
  approximate KL and the entropy of every action head; plus, from ``RUN/eval.json`` when present,
  the held-out table's J_final per controller (± standard error) labelled with its committed accuracy.
- ``lifecycle.png``: a swimlane of a few envs of one held-out episode of the run's policy
  (sampled, as trained; greedy PPO often just WAITs): stage
  of every slot over the epochs (colour), alpha as shading inside the lane, and the ops the policy
  took as markers on the slot they targeted (hollow when the op failed).

matplotlib is optional (the ``dev`` extra); :func:`plot_run` says so when it is missing.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import torch

from esper_soa.core.spec import HEAD_NAMES, Op, Stage

STAGE_COLORS = {
    Stage.DORMANT: "#f2f2f2", Stage.GERMINATED: "#c6dbef", Stage.TRAINING: "#6baed6",
    Stage.BLENDING: "#fdae6b", Stage.HOLDING: "#fd8d3c", Stage.FOSSILIZED: "#31a354",
    Stage.PRUNED: "#de2d26", Stage.EMBARGOED: "#fcbba1", Stage.RESETTING: "#bdbdbd", Stage.UNKNOWN: "#ffffff",
}
OP_MARKERS = {Op.GERMINATE: "^", Op.SET_ALPHA_TARGET: "o", Op.PRUNE: "X", Op.FOSSILIZE: "*", Op.ADVANCE: ">"}


def read_scalars(run: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``name -> (frames, values)`` from the run's TorchRL CSV logger."""
    from esper_soa.training.run_files import METRICS_DIR

    folder = Path(run) / METRICS_DIR / "scalars"
    if not folder.is_dir():
        raise FileNotFoundError(f"plot: expected the metrics that 'esper-soa train --log-dir RUN' writes "
                                f"({folder}), found no such folder")
    out = {}
    for path in sorted(folder.glob("*.csv")):
        with open(path) as fh:
            rows = [(float(a), float(b)) for a, b in csv.reader(fh)]
        out[path.stem] = ([a for a, _ in rows], [b for _, b in rows])
    return out


def _find(scalars: dict[str, Any], pattern: str) -> list[str]:
    return [k for k in scalars if re.search(pattern, k)]


def plot_learning_curves(run: Path, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run)
    eval_path = Path(run) / "eval.json"
    held_out = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    panels = [
        ("episode return", ["mean_return"]),
        ("committed objective J (pp)", _find(scalars, r"(^|_)j(_|$)|j_final")),
        ("committed accuracy (%)", _find(scalars, r"committed")),
        ("approx. KL", ["approx_kl"]),
        ("entropy per head (normalised)", [f"entropy_{h}" for h in HEAD_NAMES]),
    ]
    n = len(panels) + (held_out is not None)
    cols = 3
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    flat = list(axes.flat)
    for ax, (title, keys) in zip(flat, panels):
        keys = [k for k in keys if k in scalars]
        for k in keys:
            ax.plot(*scalars[k], label=k.removeprefix("entropy_"), lw=1.4)
        if not keys:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
        elif len(keys) > 1:
            ax.legend(fontsize=7, ncol=2)
        ax.set_title(title)
        ax.set_xlabel("frames")
        ax.grid(alpha=0.3)
    if held_out is not None:
        ax = flat[len(panels)]
        rows = held_out["rows"]
        names = list(rows)
        x = torch.arange(len(names), dtype=torch.float64)
        mean = [rows[r]["j_final"]["mean"] for r in names]
        sem = [rows[r]["j_final"]["sem"] for r in names]
        ax.bar(x.tolist(), mean, width=0.6, yerr=sem, capsize=3, color="#31a354")
        for i, r in enumerate(names):  # committed accuracy of each controller, as a label
            ax.annotate(f"{rows[r]['acc_committed']['mean']:.1f}%", (i, mean[i]), textcoords="offset points",
                        xytext=(0, 4 if mean[i] >= 0 else -12), ha="center", fontsize=7)
        ax.set_ylabel("J_final (pp) ± s.e.; label: committed acc", fontsize=8)
        ax.set_xticks(x.tolist(), names, rotation=20, fontsize=8)
        ax.axhline(0.0, color="0.3", lw=0.8)
        eng = held_out["engine"]
        ax.set_title(f"held out: {eng['dynamics']}, seeds {eng['seeds']}, {eng['max_epochs']} epochs", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"run {Path(run).resolve().name}: learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lifecycle(trace: dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """Swimlanes from an :func:`~esper_soa.training.evaluation.evaluate_controller` trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    stage, alpha = trace["stage"].numpy(), trace["alpha"].numpy()  # [T+1, n, S]
    op, slot, success = trace["op"].numpy(), trace["slot"].numpy(), trace["success"].numpy()  # [T, n]
    t1, n_envs, n_slots = stage.shape
    codes = list(range(max(int(s) for s in Stage) + 1))
    cmap = ListedColormap([STAGE_COLORS.get(Stage(c), "#ffffff") if c in Stage._value2member_map_ else "#ffffff"
                           for c in codes])
    fig, axes = plt.subplots(n_envs, 1, figsize=(12, 0.75 * n_slots * n_envs + 1.5), sharex=True, squeeze=False)
    for e, ax in enumerate(axes[:, 0]):
        ax.imshow(stage[:, e, :].T, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(codes) - 0.5,
                  interpolation="nearest", extent=(-0.5, t1 - 0.5, n_slots - 0.5, -0.5))
        epochs = torch.arange(t1).numpy()
        for s in range(n_slots):  # alpha: a dark band from the lane's bottom, height = alpha
            ax.fill_between(epochs, s + 0.45, s + 0.45 - 0.9 * alpha[:, e, s], step="mid", color="k", alpha=0.25, lw=0)
        for o, marker in OP_MARKERS.items():
            for ok in (True, False):
                sel = (op[:, e] == int(o)) & ((success[:, e] > 0.5) == ok)
                steps = torch.arange(1, t1).numpy()[sel]
                if len(steps):
                    ax.scatter(steps, slot[sel, e], marker=marker, s=60, edgecolors="k", linewidths=0.8,
                               facecolors="k" if ok else "none", zorder=3)
        ax.set_yticks(range(n_slots), [f"slot {s}" for s in range(n_slots)], fontsize=8)
        ax.set_ylabel(f"env {e}\n{trace['val_acc'][-1, e]:.1f}%", rotation=0, ha="right", va="center", fontsize=8)
    axes[-1, 0].set_xlabel("epoch (op markers at the step they were taken; hollow = failed)")
    used = sorted({int(c) for c in stage.flatten()})
    handles = [Patch(color=STAGE_COLORS[Stage(c)], label=Stage(c).name) for c in used]
    handles += [plt.Line2D([], [], marker=m, ls="", color="k", label=o.name) for o, m in OP_MARKERS.items()]
    handles.append(Patch(color="k", alpha=0.25, label="alpha (band height)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run: str | Path, n_envs: int = 4, seed: int = 1000, dynamics_config: Any = None,
             dynamics: str | None = None) -> list[Path]:
    """Write the run's PNGs into ``run`` and return their paths (see the module docstring).

    The swimlane replays the run's checkpoint (sampling, as trained: seeded by ``seed``) for one episode of ``n_envs`` envs on
    engine seed ``seed`` with the run's engine config (``dynamics`` overrides its backend)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("plot: matplotlib is not installed (pip install 'esper_soa[dev]' or matplotlib)") from exc
    from dataclasses import replace

    from esper_soa.training.evaluation import evaluate_model, load_checkpoint_model

    run = Path(run)
    out = [plot_learning_curves(run, run / "learning_curves.png")]
    checkpoint = run / "checkpoint.pt"
    if checkpoint.is_file():
        model, cfg = load_checkpoint_model(checkpoint)
        engine = replace(cfg.engine, n_envs=n_envs, compile=False, validate_actions=False,
                         dynamics=dynamics or cfg.engine.dynamics, dynamics_config=dynamics_config)
        result = evaluate_model(model, engine, [seed], greedy=False, trace_envs=n_envs)
        title = (f"run {run.resolve().name}: sampled policy, {engine.dynamics} dynamics, seed {seed}, "
                 f"{engine.max_epochs} epochs (final val_acc at the left)")
        out.append(plot_lifecycle(result.trace, run / "lifecycle.png", title))
    return out


def plot_calibration(res: dict[str, Any], path: str, n_show: int = 4) -> None:
    """Real vs surrogate: host curves, noise over time, heuristic runs, host-curve fits against the
    surrogate ranges, and the measured-contribution distributions per controller (``res`` is
    :func:`esper_soa.training.calibration.run_calibration`'s result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    from esper_soa.training.calibration import (
        fit_host_curves,
        noise_profile,
        seed_last_contributions,
    )

    real, sur = res["real"], res["surrogate"]
    controllers = [c for c in real if c != "host_only"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fit = res["host_fit"]
    t = np.arange(real["host_only"].n_epochs + 1)
    styles = {"real": ("C0", "-"), "fitted": ("C2", "--"), "default": ("0.4", "-.")}

    ax = axes[0, 0]
    for i in range(min(n_show, real["host_only"].n_envs)):
        c = colors[(i + 3) % 10]
        ax.plot(t, real["host_only"].val_acc[i], color=c, lw=1.3, label="real env" if i == 0 else None)
        ax.plot(t, fit.curve(t)[i], color=c, lw=0.9, ls=":", label="its exponential fit" if i == 0 else None)
        ax.plot(t, sur["fitted"]["host_only"].val_acc[i], color=c, lw=0.9, ls="--", alpha=0.8,
                label="fitted surrogate env" if i == 0 else None)
    d = sur["default"]["host_only"].val_acc
    ax.plot(t, d.mean(0), color="0.3", lw=1.5, ls="-.", label="default surrogate, mean +- std")
    ax.fill_between(t, d.mean(0) - d.std(0), d.mean(0) + d.std(0), color="0.5", alpha=0.2)
    ax.set(title=f"host only: val_acc of {n_show} envs", xlabel="epoch", ylabel="val_acc (%)", ylim=(0, 100))
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[0, 1]
    for label, runs, f in (("real", real, fit),
                           ("fitted", sur["fitted"], fit_host_curves(sur["fitted"]["host_only"].val_acc)),
                           ("default", sur["default"], fit_host_curves(sur["default"]["host_only"].val_acc))):
        x, prof = noise_profile(runs["host_only"].val_acc, f)
        col, ls = styles[label]
        ax.plot(x, prof, color=col, ls=ls, marker="o", ms=3, label=label if label == "real" else f"{label} surrogate")
    ax.axhline(res["fitted_values"]["eval_noise_std"], color="C2", lw=0.7)
    ax.set(title="per-epoch evaluation noise (host only)", xlabel="epoch (5-epoch windows)",
           ylabel="std(diff of residual) / sqrt 2 (pp, log)", yscale="log")
    ax.yaxis.set_major_locator(FixedLocator([0.2, 0.3, 0.5, 1, 2, 3, 5, 10]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.legend(fontsize=7)

    ax = axes[0, 2]
    name = controllers[0] if controllers else "host_only"
    for label, runs in (("real", real), ("fitted", sur["fitted"]), ("default", sur["default"])):
        a = runs[name].val_acc
        col, ls = styles[label]
        ax.plot(t, a.mean(0), color=col, ls=ls, lw=1.5,
                label=f"{label if label == 'real' else label + ' surrogate'} (n={runs[name].n_envs})")
        ax.fill_between(t, a.mean(0) - a.std(0), a.mean(0) + a.std(0), color=col, alpha=0.15)
    ax.set(title=f"{name}: val_acc mean +- std over envs", xlabel="epoch", ylabel="val_acc (%)", ylim=(0, 100))
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[1, 0]
    ax.scatter(fit.tau, fit.acc_max, s=14, color="C0", label="real env fit: (tau, a_max)")
    ax.scatter(fit.tau, fit.acc0, s=14, marker="x", color="C1", label="real env fit: (tau, a0)")
    v, dc = res["fitted_values"], res["default_config"]
    for (lo, hi), (alo, ahi), col, lab in (
        ((v["host_tau_min"], v["host_tau_max"]), (v["host_acc_max_min"], v["host_acc_max_max"]), "C0", "fitted ranges"),
        ((v["host_tau_min"], v["host_tau_max"]), (v["host_acc0_min"], v["host_acc0_max"]), "C1", None),
        ((dc.host_tau_min, dc.host_tau_max), (dc.host_acc_max_min, dc.host_acc_max_max), "0.4", "default ranges"),
        ((dc.host_tau_min, dc.host_tau_max), (dc.host_acc0_min, dc.host_acc0_max), "0.4", None),
    ):
        ax.add_patch(plt.Rectangle((lo, alo), hi - lo, ahi - alo, fill=False, ec=col, lw=1.2, label=lab))
    ax.set_xscale("log")
    ticks = [2, 3, 5, 10, 20, 40]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set(xlim=(2, 50), ylim=(-5, 102), xlabel="tau (epochs, log)", ylabel="accuracy (%)",
           title="host-curve fits vs the surrogate's ranges")
    ax.legend(fontsize=7, loc="center right")

    q = 100.0 / getattr(res["hosts_config"], "val_size", 256)  # one validation image, pp
    for col, name in enumerate(controllers[:2], start=1):
        ax = axes[1, col]
        sets = [("real", seed_last_contributions(real[name])),
                ("default surrogate", seed_last_contributions(sur["default"][name])),
                ("fitted surrogate", seed_last_contributions(sur["fitted"][name]))]
        k = np.arange(-int(round(4.0 / q)) - 1, int(round(4.0 / q)) + 2)
        bins = (k + 0.5) * q  # one bin per validation image: the real values are multiples of q
        for (lab, c), colr in zip(sets, ("C0", "0.4", "C2")):
            if len(c):
                ax.hist(np.clip(c, bins[0] + 1e-6, bins[-1] - 1e-6), bins=bins, density=True, histtype="step",
                        lw=1.5, color=colr, label=f"{lab} (n={len(c)} seeds)")
        ax.axvline(0, color="k", lw=0.6)
        ax.set(title=f"{name}: last measured contribution per seed",
               xlabel="val_acc - acc_without_slot (pp, clipped to +-4)", ylabel="density")
        if any(len(c) for _, c in sets):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
