"""Reward-integrity gate (issue 13): does a reward mode rank controllers by the real objective?

Over held-out env seeds, each scripted controller's mean episode return (discounted and not) is
compared with its mean J_final. Two controllers' J *differ* when the gap exceeds max(0.1, 3 SE of
the gap). A mode passes when Kendall's tau(return, J) over the pairs whose J differ is >= 0.8 (for
the discounted and the undiscounted return; the table also prints tau over all pairs), no pair
whose J differ is
ordered the other way by return, and every never-fossilizing controller earns less than the
heuristic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper_soa.agents.adversaries import adversary_config, adversary_step, wait_action
from esper_soa.agents.baselines import CONTROLLERS, RandomMaskedPolicy
from esper_soa.agents.heuristic import HeuristicController
from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import GAMMA, Stage
from esper_soa.env.engine import Engine

NEVER_FOSSILIZE = ("wait", "farm_blending_largest", "farm_blending_smallest", "farm_holding_largest",
                   "farm_holding_smallest")


@dataclass
class Row:
    name: str
    ret: torch.Tensor  # [N] undiscounted episode returns
    disc: torch.Tensor  # [N] discounted (GAMMA) returns
    j: torch.Tensor  # [N] J_final in pp
    fossils: torch.Tensor  # [N]

    def mean_se(self, x: torch.Tensor) -> tuple[float, float]:
        return float(x.mean()), float(x.std() / x.numel() ** 0.5)


def run_controller(name: str, cfg: EngineConfig) -> Row:
    """One episode per env of ``name`` on the engine directly (no collector: the discounted return
    needs the per-step rewards)."""
    eng = Engine(cfg)
    out = eng.reset()
    heuristic = HeuristicController(cfg, compile=False) if name == "heuristic" else None
    uniform = RandomMaskedPolicy(cfg.seed, cfg.device) if name == "random" else None
    acfg = adversary_config(name) if name not in ("random", "heuristic", "wait") else None
    ret = torch.zeros(cfg.n_envs, dtype=torch.float64)
    disc = torch.zeros(cfg.n_envs, dtype=torch.float64)
    for t in range(cfg.max_epochs):
        masks = eng.masks
        state = eng.lifecycle_state
        if heuristic is not None:
            action = heuristic.act(state, masks)
        elif acfg is not None:
            action = adversary_step(state, masks, acfg, cfg)
        elif name == "random":
            action = uniform.act(state, masks)
        else:
            action = wait_action(masks)
        out = eng.step(action)
        r = out["reward"].squeeze(-1).double()
        ret += r
        disc += GAMMA**t * r
    fossils = (eng.state["slots"]["stage"] == int(Stage.FOSSILIZED)).sum(1).double()
    return Row(name, ret, disc, out["committed_gain"].double(), fossils)


def kendall_tau(x: list[float], y: list[float], ordered: list[list[bool]] | None = None) -> float:
    """Kendall's tau between ``x`` and ``y`` over the pairs ``ordered[i][k]`` says ``y`` orders
    (all pairs by default): (concordant - discordant) / those pairs, ties in ``x`` counting as
    neither. The gate orders by J only the pairs whose J differ beyond the noise: every
    never-fossilizing controller has J exactly 0, and those ties, counted in the denominator, would
    cap the statistic near 0.8 whatever the reward did."""
    concordant = discordant = pairs = 0
    for i in range(len(x)):
        for k in range(i + 1, len(x)):
            if y[i] == y[k] or (ordered is not None and not ordered[i][k]):
                continue
            pairs += 1
            sign = (x[i] - x[k]) * (y[i] - y[k])
            concordant += sign > 0
            discordant += sign < 0
    return (concordant - discordant) / pairs if pairs else 0.0


def gate(rows: list[Row]) -> dict[str, object]:
    """The three criteria for one mode's rows; ``violations`` names every mis-ordered pair. Two
    controllers' J differ when the gap exceeds max(0.1, 3 SE of the gap)."""
    j = [r.mean_se(r.j) for r in rows]
    n = len(rows)
    differ = [[abs(j[a][0] - j[b][0]) > max(0.1, 3 * (j[a][1] ** 2 + j[b][1] ** 2) ** 0.5) for b in range(n)]
              for a in range(n)]
    violations = []
    for key in ("ret", "disc"):
        ret = [float(getattr(r, key).mean()) for r in rows]
        for a in range(n):
            for b in range(n):
                if differ[a][b] and j[a][0] > j[b][0] and ret[a] <= ret[b]:
                    violations.append(f"{key}: {rows[a].name} (J {j[a][0]:.2f}) <= {rows[b].name} (J {j[b][0]:.2f})")
    by_name = {r.name: float(r.ret.mean()) for r in rows}
    farms_lose = all(by_name[n] < by_name["heuristic"] for n in NEVER_FOSSILIZE if n in by_name)
    means = [m for m, _ in j]
    tau = min(kendall_tau([float(getattr(r, key).mean()) for r in rows], means, differ) for key in ("ret", "disc"))
    tau_all = min(kendall_tau([float(getattr(r, key).mean()) for r in rows], means) for key in ("ret", "disc"))
    return {"tau": tau, "tau_all_pairs": tau_all, "violations": violations, "farms_lose": farms_lose,
            "passed": tau >= 0.8 and not violations and farms_lose}


def integrity_table(mode: str, n_envs: int = 128, seeds: tuple[int, ...] = (1000,), max_epochs: int = 150) -> tuple[list[Row], dict]:
    """Rows of every controller in :data:`CONTROLLERS` under ``mode`` on the held-out ``seeds``."""
    rows = []
    for name in CONTROLLERS:
        parts = [run_controller(name, EngineConfig(n_envs=n_envs, reward_mode=mode, seed=s, max_epochs=max_epochs,
                                                   validate_actions=False)) for s in seeds]
        rows.append(Row(name, *(torch.cat([getattr(p, k) for p in parts]) for k in ("ret", "disc", "j", "fossils"))))
    return rows, gate(rows)


def format_rows(mode: str, rows: list[Row], verdict: dict) -> str:
    lines = [f"== {mode}: Kendall tau {verdict['tau']:.2f} (all pairs {verdict['tau_all_pairs']:.2f}), never-fossilize controllers below heuristic: "
             f"{verdict['farms_lose']}, {'PASS' if verdict['passed'] else 'FAIL'}",
             f"{'controller':24s} {'return':>16s} {'disc. return':>16s} {'J_final (pp)':>16s} {'fossils/ep':>10s}"]
    for r in rows:
        (m, s), (dm, ds), (jm, js) = r.mean_se(r.ret), r.mean_se(r.disc), r.mean_se(r.j)
        lines.append(f"{r.name:24s} {m:9.2f} ±{s:<5.2f} {dm:9.2f} ±{ds:<5.2f} {jm:9.3f} ±{js:<5.3f} {float(r.fossils.mean()):10.2f}")
    lines += [f"  violation: {v}" for v in verdict["violations"][:12]]
    return "\n".join(lines)
