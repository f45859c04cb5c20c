"""Command line: ``esper-soa demo`` (collector rollouts of the baselines, throughput) and
``esper-soa train`` (PPO on the surrogate, compared with the baselines).

``run_collector`` is the one place that drives ``torchrl.collectors.Collector`` over
``EsperEnv``; the scripts in ``scripts/`` and the trainer's evaluation reuse it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import Compose, RewardSum, Transform, TransformedEnv

from esper_soa.config import REWARD_MODES, EngineConfig
from esper_soa.env import EsperEnv
from esper_soa.spec import Op, Stage


EPISODE_METRICS = ("return", "final_accuracy", "j_final", "committed_accuracy", "fossils")
AUTO_FORWARD_GATES = ("g1", "g2", "g3")


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


def final_stats(observation: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(val_acc in %, number of FOSSILIZED slots) read back from observations ``[N, 23+31S]``."""
    accuracy = observation[:, 2] * 100.0
    stage_block = observation[:, 23:].reshape(observation.shape[0], n_slots, 31)[:, :, 1:11]
    return accuracy, stage_block[:, :, int(Stage.FOSSILIZED) - 1].sum(1)


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
        accuracy, fossil_count = final_stats(nxt["observation"][done], env.cfg.n_slots)
        for name, value in zip(EPISODE_METRICS, (
            nxt["episode_reward"].squeeze(-1)[done], accuracy, nxt["committed_gain"][done],
            nxt["acc_committed"][done], fossil_count,
        )):
            per_episode[name].append(value.cpu())
        op_counts += torch.bincount(batch["action", "op"].flatten().cpu(), minlength=len(Op))
    seconds = time.perf_counter() - start
    collector.shutdown()
    samples = {k: torch.cat(v) if v else torch.zeros(0) for k, v in per_episode.items()}
    return stats_from_samples(samples, frames, seconds, {op.name: int(c) for op, c in zip(Op, op_counts)})


def parse_auto_forward(text: str) -> frozenset[str]:
    """``--auto-forward``: a comma-separated subset of ``g1,g2,g3`` (the gates the engine passes
    by itself, SPEC §3) or ``none``."""
    gates = frozenset(g.strip().lower() for g in text.split(",") if g.strip())
    if gates == {"none"}:
        return frozenset()
    if not gates or not gates <= set(AUTO_FORWARD_GATES):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(AUTO_FORWARD_GATES)} or 'none', got {text!r}"
        )
    return gates


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        n_envs=args.n_envs,
        n_slots=args.slots,
        topology=args.topology,
        max_epochs=args.max_epochs,
        gate_mode=args.gate_mode,
        auto_forward_g1="g1" in args.auto_forward,
        auto_forward_g2="g2" in args.auto_forward,
        auto_forward_g3="g3" in args.auto_forward,
        reward_mode=args.reward_mode,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        validate_actions=not args.no_validate,
    )


def add_engine_args(parser: argparse.ArgumentParser, n_envs: int = 256, max_epochs: int = 150) -> None:
    parser.add_argument("--n-envs", type=int, default=n_envs)
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--topology", default="cnn", choices=["cnn", "transformer"])
    parser.add_argument("--max-epochs", type=int, default=max_epochs)
    parser.add_argument("--gate-mode", default="permissive", choices=["permissive", "strict"])
    parser.add_argument(
        "--auto-forward", type=parse_auto_forward, default=",".join(AUTO_FORWARD_GATES), metavar="GATES",
        help="gates passed without an ADVANCE (comma-separated g1,g2,g3 or 'none'; default: all three, as "
             "the original ships; with all three ADVANCE is masked off)",
    )
    parser.add_argument("--reward-mode", default="committed", choices=list(REWARD_MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine step")
    parser.add_argument("--no-validate", action="store_true", help="skip per-step action checks (no host sync)")


def format_stats(name: str, stats: RolloutStats) -> str:
    return (
        f"{name:10s} frames={stats.frames:>8d}  {stats.frames_per_second:>11,.0f} frames/s  "
        f"episodes={stats.episodes:>5d}  return={stats.mean_return:8.3f}  J={stats.j_final:6.3f}  "
        f"final acc={stats.mean_final_accuracy:6.2f}%  committed acc={stats.committed_accuracy:6.2f}%  "
        f"fossils/ep={stats.fossils_per_episode:5.2f}"
    )


def format_table(rows: Sequence[tuple[str, RolloutStats]]) -> str:
    """Evaluation table: mean return and J_final (the real objective), committed and final
    accuracy, fossils per episode, each mean with its standard error."""
    def cell(stats: RolloutStats, value: float, name: str, width: int, digits: int) -> str:
        return f"{value:{width}.{digits}f} ±{stats.se(name):<6.{digits}f}"

    lines = [f"{'controller':15s} {'mean return':>17s} {'J_final (pp)':>16s} {'committed acc %':>16s} "
             f"{'final acc %':>16s} {'fossils/ep':>15s} {'episodes':>9s}"]
    for name, s in rows:
        lines.append(
            f"{name:15s} {cell(s, s.mean_return, 'return', 9, 2)} {cell(s, s.j_final, 'j_final', 8, 3)} "
            f"{cell(s, s.committed_accuracy, 'committed_accuracy', 8, 2)} "
            f"{cell(s, s.mean_final_accuracy, 'final_accuracy', 8, 2)} {cell(s, s.fossils_per_episode, 'fossils', 7, 2)} "
            f"{s.episodes:9d}"
        )
    return "\n".join(lines)


def collect_baseline(name: str, cfg: EngineConfig, episodes: int) -> RolloutStats:
    """``episodes`` episodes per env of a scripted controller (``random``, ``heuristic``, ``wait``
    or an adversary, :data:`esper_soa.baselines.CONTROLLERS`) via Collector."""
    from esper_soa.baselines import CONTROLLERS, HeuristicPolicy, RandomMaskedPolicy, ScriptedPolicy

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


def collect_script(name: str, argv: list[str] | None = None) -> None:
    """Entry point of ``scripts/collect_<name>.py``."""
    parser = argparse.ArgumentParser(description=f"Collector over EsperEnv with the {name} controller")
    add_engine_args(parser, n_envs=1024)
    parser.add_argument("--episodes", type=int, default=2)
    args = parser.parse_args(argv)
    stats = collect_baseline(name, engine_config_from_args(args), args.episodes)
    print(format_stats(name, stats))
    print("ops:", stats.op_counts)


def demo(args: argparse.Namespace) -> None:
    """Random and heuristic controllers through a TorchRL Collector; prints throughput."""
    cfg = engine_config_from_args(args)
    for name in ("random", "heuristic"):
        print(format_stats(name, collect_baseline(name, cfg, args.episodes)))


def train_command(args: argparse.Namespace) -> None:
    """PPO on the surrogate, then a held-out comparison with the random and heuristic controllers."""
    from dataclasses import replace

    from esper_soa.train import TrainConfig, evaluate, evaluate_baseline, train

    # the policy only ever samples valid actions, so the per-step validation sync is skipped
    engine = replace(engine_config_from_args(args), validate_actions=False)
    cfg = TrainConfig(
        engine=engine,
        updates=args.updates,
        rollout_len=args.rollout_len,
        collector=args.collector,
        seed=args.seed,
        hidden=args.hidden,
        recurrent="lstm" if args.lstm else None,
        lr=args.lr,
        entropy_coef=args.entropy_coef,
        ppo_epochs=args.ppo_epochs,
        minibatches=args.minibatches,
        log_dir=args.log_dir,
        checkpoint_every=args.checkpoint_every if args.log_dir else 0,
    )
    start = time.perf_counter()
    result = train(cfg, resume=args.resume)
    train_s = time.perf_counter() - start
    seeds = [int(s) for s in args.eval_seeds.split(",")]
    held_out = replace(engine, n_envs=args.eval_envs, compile=False)
    rows = [
        ("ppo (sampled)", evaluate(result.model, held_out, seeds, greedy=False)),
        ("ppo (greedy)", evaluate(result.model, held_out, seeds, greedy=True)),
        ("random", evaluate_baseline("random", held_out, seeds)),
        ("heuristic", evaluate_baseline("heuristic", held_out, seeds)),
        ("wait", evaluate_baseline("wait", held_out, seeds)),
    ]
    frames = result.history[-1]["frames"] if result.history else 0
    print(f"\ntrained {len(result.history)} updates ({frames:,} frames) in {train_s:.0f} s"
          + (f"; logs and checkpoint in {result.log_dir}" if result.log_dir else ""))
    gates = ",".join(sorted(args.auto_forward)) or "none"
    print(f"held-out env seeds {seeds} x {args.eval_envs} envs, {engine.max_epochs}-epoch episodes, "
          f"{engine.reward_mode} reward, auto-forward {gates}:")
    print(format_table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="esper-soa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="collector rollouts of the random and heuristic controllers")
    add_engine_args(p_demo, n_envs=256, max_epochs=150)
    p_demo.add_argument("--episodes", type=int, default=1)
    p_demo.set_defaults(func=demo)
    p_train = sub.add_parser("train", help="PPO on the surrogate (a few CPU minutes), compared with the baselines")
    # defaults chosen from runs (bench/RESULTS.md, "PPO on the COMMITTED reward"): 30 updates of
    # 128 envs x 150 steps (576k frames, ~3 min on a busy 2-core CPU) beat the heuristic's J_final
    add_engine_args(p_train, n_envs=128, max_epochs=150)
    p_train.add_argument("--updates", type=int, default=30)
    p_train.add_argument("--rollout-len", type=int, default=None, help="steps per env per update (default: max epochs)")
    p_train.add_argument("--collector", default="engine", choices=["engine", "torchrl"])
    p_train.add_argument("--hidden", type=int, default=128)
    p_train.add_argument("--lstm", action="store_true", help="LSTM after the MLP trunk")
    p_train.add_argument("--lr", type=float, default=1e-3)
    p_train.add_argument("--entropy-coef", type=float, default=0.05, help="entropy bonus (per-head multipliers apply)")
    p_train.add_argument("--ppo-epochs", type=int, default=4)
    p_train.add_argument("--minibatches", type=int, default=8)
    p_train.add_argument("--log-dir", default=None, help="metrics.jsonl / metrics.csv / checkpoint.pt go here")
    p_train.add_argument("--checkpoint-every", type=int, default=10)
    p_train.add_argument("--resume", default=None, help="checkpoint to resume from")
    p_train.add_argument("--eval-seeds", default="1000,1001", help="held-out env seeds, comma-separated")
    p_train.add_argument("--eval-envs", type=int, default=128)
    p_train.set_defaults(func=train_command)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
