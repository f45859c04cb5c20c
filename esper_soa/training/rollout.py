"""Rollouts through TorchRL's ``Collector``: the one place that drives it over ``EsperEnv``.

``run_collector`` summarises finished episodes (return next to the real objective J, SPEC §12b);
the CLI, the scripts, the trainer's held-out evaluation and the benches all use it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import Compose, RewardSum, Transform, TransformedEnv

from esper_soa.core.config import EngineConfig
from esper_soa.core.spec import Op
from esper_soa.env.esper_env import EsperEnv

EPISODE_METRICS = ("return", "final_accuracy", "j_final", "committed_accuracy", "fossils")

@dataclass
class RolloutStats:
    """Finished episodes' means. ``j_final`` is the real objective (SPEC §12b: committed accuracy
    gain over the host alone minus fossil params / 50,000, in pp); ``samples`` keeps the
    per-episode values of :data:`EPISODE_METRICS` so pooled means and standard errors are exact."""

    frames: int
    seconds: float
    mean_return: float
    episodes: int
    mean_final_accuracy: float
    fossils_per_episode: float
    op_counts: dict[str, int]
    j_final: float = float("nan")
    committed_accuracy: float = float("nan")
    samples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    def se(self, name: str) -> float:
        """Standard error of the mean of one of :data:`EPISODE_METRICS` over the episodes."""
        x = self.samples.get(name)
        if x is None or x.numel() < 2:
            return float("nan")
        return float(x.double().std() / x.numel() ** 0.5)


def stats_from_samples(
    samples: dict[str, torch.Tensor], frames: int, seconds: float, op_counts: dict[str, int]
) -> RolloutStats:
    """Means of the per-episode ``samples`` (NaN when no episode finished)."""

    def mean(name: str) -> float:
        x = samples[name]
        return float(x.double().mean()) if x.numel() else float("nan")

    return RolloutStats(
        frames=frames, seconds=seconds, mean_return=mean("return"), episodes=samples["return"].numel(),
        mean_final_accuracy=mean("final_accuracy"), fossils_per_episode=mean("fossils"), op_counts=op_counts,
        j_final=mean("j_final"), committed_accuracy=mean("committed_accuracy"), samples=samples,
    )


def run_collector(
    env: EsperEnv,
    policy: TensorDictModuleBase,
    frames_per_batch: int,
    total_frames: int,
    transforms: Sequence[Transform] = (),
) -> RolloutStats:
    """Collect with ``Collector`` and summarise finished episodes (returns, accuracy, fossils).

    ``transforms`` are appended after ``RewardSum`` (e.g. a recurrent policy's ``InitTracker``
    and state primer)."""
    tenv = TransformedEnv(env, Compose(RewardSum(), *transforms))
    collector = Collector(
        tenv,
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=total_frames,
        auto_register_policy_transforms=False,
    )
    per_episode: dict[str, list[torch.Tensor]] = {k: [] for k in EPISODE_METRICS}
    op_counts = torch.zeros(len(Op), dtype=torch.int64)
    frames = 0
    start = time.perf_counter()
    for batch in collector:
        frames += batch.numel()
        done = batch["next", "done"].squeeze(-1)
        nxt = batch["next"]
        for name, value in zip(EPISODE_METRICS, (
            nxt["episode_reward"].squeeze(-1)[done], nxt["val_acc"][done], nxt["committed_gain"][done],
            nxt["acc_committed"][done], nxt["fossils"][done],
        )):
            per_episode[name].append(value.cpu())
        op_counts += torch.bincount(batch["action", "op"].flatten().cpu(), minlength=len(Op))
    seconds = time.perf_counter() - start
    collector.shutdown()
    samples = {k: torch.cat(v) if v else torch.zeros(0) for k, v in per_episode.items()}
    return stats_from_samples(samples, frames, seconds, {op.name: int(c) for op, c in zip(Op, op_counts)})


def collect_baseline(name: str, cfg: EngineConfig, episodes: int) -> RolloutStats:
    """``episodes`` episodes per env of a scripted controller (``random``, ``heuristic``, ``wait``
    or an adversary, :data:`esper_soa.agents.baselines.CONTROLLERS`) via Collector."""
    from esper_soa.agents.baselines import (
        CONTROLLERS,
        HeuristicPolicy,
        RandomMaskedPolicy,
        ScriptedPolicy,
    )

    if name not in CONTROLLERS:
        raise ValueError(f"controller: expected one of {CONTROLLERS}, got {name!r}")
    env = EsperEnv(cfg)
    if name == "random":
        policy = RandomMaskedPolicy(cfg.seed, cfg.device)
    elif name == "heuristic":
        policy = HeuristicPolicy(env)
    else:
        policy = ScriptedPolicy(env, name)
    frames = cfg.n_envs * cfg.max_epochs
    return run_collector(env, policy, frames, frames * episodes)
