"""Held-out evaluation: any controller, whole episodes, per-episode outcomes with standard errors.

One function, :func:`evaluate_controller`, runs a controller (a trained policy, the heuristic, the
random masked policy or always-WAIT) for one full episode on every env of each held-out engine
seed, through the same TorchRL ``EsperEnv`` (and the policy's env transforms) that training uses,
and reads each episode's outcome from the engine state at the step the episode ends (before any
reset, so nothing is lost to an auto-reset). ``esper-soa eval`` and the table ``esper-soa train``
prints after training are both built on it, so "the number in the table" has one definition.

Per-episode outcomes (:data:`COLUMNS`): the episode return, ``J_final`` (SPEC §12b: committed
accuracy gain over the host alone minus ``fossil_params / 50,000``), committed accuracy, final
accuracy, the number of fossils and the parameters they added. See :func:`committed_objective`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import Compose, Transform, TransformedEnv
from torchrl.envs.utils import step_mdp

from esper_soa.core.config import EngineConfig
from esper_soa.core.reward import committed_gain, fossil_params
from esper_soa.core.spec import Stage
from esper_soa.env.esper_env import EsperEnv
from esper_soa.training.distributed import Comm

BASELINES = ("heuristic", "random", "wait")
COLUMNS = {  # key -> table header
    "return": "return",
    "j_final": "J_final (pp)",
    "acc_committed": "committed acc %",
    "final_acc": "final acc %",
    "fossils": "fossils",
    "params_added": "params added",
}


def committed_objective(state: TensorDictBase) -> dict[str, torch.Tensor]:
    """SPEC §12b's committed objective of each env's current state, ``[E]`` tensors: the
    committed accuracy (every non-FOSSILIZED seed's alpha at 0, the backends' ``acc_committed``),
    ``J = acc_committed - acc_all_seeds_off - fossil_params / 50,000`` in pp
    (:func:`esper_soa.core.reward.committed_gain`, the same J the COMMITTED reward pays), the fossils
    and the parameters they added."""
    sl = state["slots"]
    fossil = sl["stage"] == int(Stage.FOSSILIZED)
    return {
        "acc_committed": state["acc_committed"],
        "j_final": committed_gain(state),
        "fossils": fossil.sum(-1).to(torch.float32),
        "params_added": fossil_params(state),
    }


def episode_outcome(state: TensorDictBase) -> dict[str, torch.Tensor]:
    """Every :data:`COLUMNS` value of each env's current state (read when its episode ends)."""
    return {"return": state["episode_return"], "final_acc": state["val_acc"], **committed_objective(state)}


@dataclass
class EvalResult:
    """One controller's per-episode outcomes (``[N]`` CPU tensors keyed like :data:`COLUMNS`)."""

    name: str
    outcomes: dict[str, torch.Tensor]
    seconds: float = 0.0
    trace: dict[str, torch.Tensor] | None = None  # the first seed's first envs, see evaluate_controller

    @property
    def episodes(self) -> int:
        return int(self.outcomes["return"].numel())

    def mean(self, key: str) -> float:
        return float(self.outcomes[key].double().mean())

    def sem(self, key: str) -> float:
        """Standard error of the mean over episodes (NaN with fewer than two)."""
        x = self.outcomes[key].double()
        return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else math.nan

    def summary(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "seconds": self.seconds,
                **{k: {"mean": self.mean(k), "sem": self.sem(k)} for k in COLUMNS}}


PolicyFactory = Callable[[EsperEnv, int], TensorDictModuleBase]


def evaluate_controller(
    name: str,
    make_policy: PolicyFactory,
    cfg: EngineConfig,
    seeds: Sequence[int],
    transforms: Callable[[], Sequence[Transform]] = list,
    trace_envs: int = 0,
) -> EvalResult:
    """One episode per env of ``make_policy(env, seed)`` on each engine seed in ``seeds``.

    Every env runs exactly ``cfg.max_epochs`` steps without auto-reset; an env that terminates
    early (divergence) is recorded at the step it ends. ``transforms`` builds the env transforms
    the policy needs (a recurrent policy's ``InitTracker`` and state primer), fresh per seed.
    ``trace_envs``: also record the first seed's first envs step by step (``stage``/``alpha``
    ``[T+1, n, S]`` from the reset on, the ``op``/``slot`` taken and ``success`` ``[T, n]``, and
    ``val_acc`` ``[T+1, n]``): the lifecycle swimlane of ``esper-soa plot``.
    """
    parts: list[dict[str, torch.Tensor]] = []
    steps: list[dict[str, torch.Tensor]] = []
    start = time.perf_counter()
    for seed in seeds:
        env = EsperEnv(replace(cfg, seed=int(seed)))
        policy = make_policy(env, int(seed))
        extra = list(transforms())
        tenv = TransformedEnv(env, Compose(*extra)) if extra else env
        td = tenv.reset()
        ended = torch.zeros(cfg.n_envs, dtype=torch.bool, device=env.device)
        final: dict[str, torch.Tensor] | None = None
        tracing = trace_envs > 0 and not parts
        if tracing:
            steps.append(_trace_row(env.engine.state, None, trace_envs))
        for _ in range(cfg.max_epochs):
            with torch.no_grad():  # the policy only; a hosts backend trains its hosts with autograd
                td = policy(td)
            td = tenv.step(td)
            state = env.engine.state
            if tracing:
                steps.append(_trace_row(state, td["action"], trace_envs))
            now = episode_outcome(state)
            newly = td["next", "done"].reshape(-1) & ~ended
            final = now if final is None else {k: torch.where(newly, now[k], final[k]) for k in now}
            ended = ended | newly
            td = step_mdp(td)
        assert final is not None and bool(ended.all()), "every episode ends by cfg.max_epochs"
        parts.append({k: v.detach().cpu() for k, v in final.items()})
    outcomes = {k: torch.cat([p[k] for p in parts]) for k in COLUMNS}
    trace = None
    if steps:
        trace = {k: torch.stack([r[k] for r in steps]) for k in steps[0]}  # from the reset on
        trace.update({k: torch.stack([r[k] for r in steps[1:]]) for k in _PER_ACTION})
    return EvalResult(name, outcomes, time.perf_counter() - start, trace)


_PER_ACTION = ("op", "slot", "success")  # recorded after each step, not at the reset


def _trace_row(state: TensorDictBase, action: TensorDictBase | None, n: int) -> dict[str, torch.Tensor]:
    sl = state["slots"]
    row = {"stage": sl["stage"][:n], "alpha": sl["alpha"][:n], "val_acc": state["val_acc"][:n]}
    if action is not None:
        row.update(op=action["op"][:n], slot=action["slot"][:n], success=state["last_action_success"][:n])
    return {k: v.detach().cpu().clone() for k, v in row.items()}


def baseline_factory(name: str) -> PolicyFactory:
    """The ``heuristic``, ``random`` (seeded by the engine seed) or ``wait`` controller."""
    from esper_soa.agents.baselines import (
        HeuristicPolicy,
        RandomMaskedPolicy,
        ScriptedPolicy,
    )

    if name == "heuristic":
        return lambda env, seed: HeuristicPolicy(env)
    if name == "random":
        return lambda env, seed: RandomMaskedPolicy(seed, env.device)
    if name == "wait":
        return lambda env, seed: ScriptedPolicy(env, "wait")
    raise ValueError(f"baseline: expected one of {BASELINES}, got {name!r}")


def evaluate_model(
    model: Any, cfg: EngineConfig, seeds: Sequence[int], *, greedy: bool, trace_envs: int = 0
) -> EvalResult:
    """A trained :class:`~esper_soa.agents.policy.ActorCritic`, greedy or sampled (the sampling is
    seeded by the engine seed, so the table is reproducible)."""
    previous = model.actor.deterministic
    model.actor.deterministic = greedy

    def make(env: EsperEnv, seed: int) -> TensorDictModuleBase:
        torch.manual_seed(seed)
        return model.policy

    try:
        return evaluate_controller("ppo (greedy)" if greedy else "ppo (sampled)", make, cfg, seeds,
                                   model.env_transforms, trace_envs)
    finally:
        model.actor.deterministic = previous


def compare(model: Any | None, cfg: EngineConfig, seeds: Sequence[int],
            baselines: Sequence[str] = BASELINES) -> list[EvalResult]:
    """The eval table's rows: the model greedy and sampled (if given), then each baseline."""
    rows = []
    if model is not None:
        rows += [evaluate_model(model, cfg, seeds, greedy=True), evaluate_model(model, cfg, seeds, greedy=False)]
    rows += [evaluate_controller(b, baseline_factory(b), cfg, seeds) for b in baselines]
    return rows


def gather_results(rows: Sequence[EvalResult], comm: Comm) -> list[EvalResult] | None:
    """The table's rows over every rank's shard of the eval envs, on rank 0 (None elsewhere): the
    per-episode outcomes are concatenated, so means and standard errors are over all episodes."""
    local = [replace(r, outcomes={k: v.cpu() for k, v in r.outcomes.items()}, trace=None) for r in rows]
    gathered = comm.gather_objects(local)
    if gathered is None:
        return None
    merged = []
    for i, first in enumerate(rows):  # rank order; the table's means and errors ignore the order
        parts = [g[i] for g in gathered]
        outcomes = {k: torch.cat([p.outcomes[k] for p in parts]) for k in first.outcomes}
        merged.append(EvalResult(first.name, outcomes, max(p.seconds for p in parts), first.trace))
    return merged


def format_table(rows: Sequence[EvalResult]) -> str:
    """Markdown table, ``mean ± standard error`` per column."""
    head = "| controller | episodes | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for k in COLUMNS:
            digits = 0 if k == "params_added" else 2
            cells.append(f"{r.mean(k):.{digits}f} ± {r.sem(k):.{digits}f}")
        lines.append(f"| {r.name} | {r.episodes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, training config) of a trainer checkpoint (``RUN/checkpoint.pt``)."""
    from dataclasses import fields

    from esper_soa.training.train import TrainConfig, make_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: expected a file written by 'esper-soa train --log-dir RUN' "
                                f"(RUN/checkpoint.pt), got {str(path)!r}, which does not exist")
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"checkpoint {str(path)!r}: expected a trainer checkpoint with 'model' and 'config'")
    saved = dict(state["config"])
    engine = {f.name: saved["engine"][f.name] for f in fields(EngineConfig) if f.name in saved["engine"]}
    if isinstance(engine.get("enabled_slots"), list):
        engine["enabled_slots"] = tuple(engine["enabled_slots"])
    engine.update(device=device, dynamics_config=None)  # the eval picks its own backend
    known = {f.name for f in fields(TrainConfig)} - {"engine"}
    cfg = TrainConfig(engine=EngineConfig(**engine), **{k: v for k, v in saved.items() if k in known})
    model = make_model(cfg).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg
