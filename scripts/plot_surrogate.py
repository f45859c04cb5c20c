"""Plot a few envs of the surrogate host dynamics with and without a seed blending in.

Writes ``docs/surrogate_trajectories.png``. The state is driven by hand (no engine, no policy):
a seed germinates at epoch 10, trains until epoch 20, blends in linearly over 5 epochs (ADD) and
is then held at alpha 1. For each shown env the same env key is run three times: host only, with
a seed whose hidden benefit is positive, and with one whose benefit is negative.

Usage: ``python scripts/plot_surrogate.py [--out PATH] [--seed N]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import torch  # noqa: E402

from esper_soa.core.config import EngineConfig  # noqa: E402
from esper_soa.core.spec import TOPOLOGY_BLUEPRINTS, AlphaAlgorithm, Blueprint, Stage  # noqa: E402
from esper_soa.core.state import make_state  # noqa: E402
from esper_soa.dynamics.surrogate import SurrogateDynamics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

N_ENVS = 64
N_SLOTS = 3
SLOT = 2  # widest cnn slot
HELPFUL_PP, HARMFUL_PP = 2.5, -2.0  # hidden benefits of the shown seeds (roughly)
GERMINATE, TRAIN_END, BLEND_EPOCHS, EPOCHS = 10, 20, 5, 150


def schedule(t: int) -> tuple[Stage, float]:
    """Stage and alpha of the seed slot when the dynamics run at epoch ``t``."""
    if t < GERMINATE:
        return Stage.DORMANT, 0.0
    if t == GERMINATE:
        return Stage.GERMINATED, 0.0
    if t <= TRAIN_END:
        return Stage.TRAINING, 0.0
    if t <= TRAIN_END + BLEND_EPOCHS:
        return Stage.BLENDING, (t - TRAIN_END) / BLEND_EPOCHS
    return Stage.HOLDING, 1.0


def run(dyn: SurrogateDynamics, cfg: EngineConfig, blueprint: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Drive every env through the schedule with a per-env blueprint (None = no seed)."""
    aux = dyn.init_aux(cfg.n_envs, cfg.seed)
    st = make_state(cfg).to_dict()
    sl = st["slots"]
    prev = 0.0
    out: dict[str, list[torch.Tensor]] = {"val_acc": [], "off": [], "loo": []}
    for t in range(EPOCHS):
        stage, alpha = schedule(t) if blueprint is not None else (Stage.DORMANT, 0.0)
        live = stage != Stage.DORMANT
        sl["stage"][:, SLOT] = int(stage)
        sl["alpha"][:, SLOT] = alpha
        sl["previous_alpha"][:, SLOT] = prev
        sl["algorithm"][:, SLOT] = int(AlphaAlgorithm.ADD) if live else 0
        sl["blueprint"][:, SLOT] = blueprint if live else 0
        st["epoch"][:] = t
        m, aux = dyn.advance(st, aux)
        out["val_acc"].append(m["val_acc"])
        out["off"].append(m["acc_all_seeds_off"])
        out["loo"].append(m["val_acc"] - m["acc_without_slot"][:, SLOT])
        prev = alpha
    return {k: torch.stack(v, 1) for k, v in out.items()}  # [E, T]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "surrogate_trajectories.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-show", type=int, default=3)
    args = ap.parse_args()

    cfg = EngineConfig(n_envs=N_ENVS, n_slots=N_SLOTS, topology="cnn", seed=args.seed)
    dyn = SurrogateDynamics(cfg)
    aux = dyn.init_aux(N_ENVS, args.seed)
    valid = torch.tensor(TOPOLOGY_BLUEPRINTS["cnn"])
    ben = aux["benefit"][:, SLOT][:, valid]  # [E, 7] hidden benefit of each valid blueprint
    # per env, the blueprints closest to typical helpful / harmful benefits; show the envs that
    # have both (not the extreme tails, which would misrepresent the typical seed)
    near_good = (ben - HELPFUL_PP).abs().min(1)
    near_bad = (ben - HARMFUL_PP).abs().min(1)
    envs = (near_good.values + near_bad.values).argsort()[: args.n_show].sort().values
    good_bp = valid[near_good.indices]
    bad_bp = valid[near_bad.indices]

    host = run(dyn, cfg, None)
    good = run(dyn, cfg, good_bp)
    bad = run(dyn, cfg, bad_bp)

    t = torch.arange(EPOCHS)
    fig, axes = plt.subplots(2, len(envs), figsize=(5.2 * len(envs), 7.5), sharex=True, squeeze=False)
    for col, e in enumerate(envs.tolist()):
        g_name, b_name = Blueprint(int(good_bp[e])).name, Blueprint(int(bad_bp[e])).name
        ax = axes[0, col]
        ax.plot(t, host["val_acc"][e], color="0.3", lw=1.2, label="host only")
        ax.plot(t, good["val_acc"][e], color="tab:green", lw=1.2, label=f"+ {g_name} (helpful)")
        ax.plot(t, bad["val_acc"][e], color="tab:red", lw=1.2, label=f"+ {b_name} (harmful)")
        ax.plot(t, good["off"][e], color="tab:green", lw=0.8, ls="--", label="all seeds off (helpful run)")
        ax.plot(t, bad["off"][e], color="tab:red", lw=0.8, ls="--", label="all seeds off (harmful run)")
        g_b = float(aux["benefit"][e, SLOT, good_bp[e]])
        b_b = float(aux["benefit"][e, SLOT, bad_bp[e]])
        ax.set_title(f"env {e}: hidden benefits {g_b:+.2f} / {b_b:+.2f} pp")
        ax.set_ylabel("val_acc (%)")
        ax.legend(fontsize=7, loc="lower right")

        ax = axes[1, col]
        ax.plot(t, good["loo"][e], color="tab:green", lw=1.0, label="LOO contribution (helpful)")
        ax.plot(t, good["val_acc"][e] - host["val_acc"][e], color="tab:green", lw=1.0, ls=":",
                label="val_acc - host-only run (helpful)")
        ax.plot(t, bad["loo"][e], color="tab:red", lw=1.0, label="LOO contribution (harmful)")
        ax.plot(t, bad["val_acc"][e] - host["val_acc"][e], color="tab:red", lw=1.0, ls=":",
                label="val_acc - host-only run (harmful)")
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_xlabel("epoch")
        ax.set_ylabel("pp")
        ax.legend(fontsize=7, loc="center right")
        for row in axes[:, col]:
            row.axvspan(GERMINATE, TRAIN_END + 0.5, color="tab:blue", alpha=0.08)
            row.axvspan(TRAIN_END + 0.5, TRAIN_END + BLEND_EPOCHS + 0.5, color="tab:orange", alpha=0.15)
    fig.suptitle(
        "Surrogate dynamics (cnn, slot 2, ADD): germinate @10, train to 20 (blue), "
        "linear blend over 5 epochs (orange), hold at alpha 1"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
