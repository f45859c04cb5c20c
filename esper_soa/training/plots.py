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
    from esper_soa.training.train import METRICS_DIR

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
