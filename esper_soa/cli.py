"""Command line: ``esper-soa demo`` (collector rollouts of the baselines, throughput) and
``esper-soa train`` (PPO on the surrogate, compared with the baselines).

``run_collector`` is the one place that drives ``torchrl.collectors.Collector`` over
``EsperEnv``; the scripts in ``scripts/`` and the trainer's evaluation reuse it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tensordict.nn import TensorDictModuleBase
from torchrl.collectors import Collector
from torchrl.envs import Compose, RewardSum, Transform, TransformedEnv

from esper_soa.config import EngineConfig
from esper_soa.env import EsperEnv
from esper_soa.spec import Op, Stage


@dataclass
class RolloutStats:
    frames: int
    seconds: float
    mean_return: float
    episodes: int
    mean_final_accuracy: float
    fossils_per_episode: float
    op_counts: dict[str, int]

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


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
    returns, accuracies, fossils = [], [], []
    op_counts = torch.zeros(len(Op), dtype=torch.int64)
    frames = 0
    start = time.perf_counter()
    for batch in collector:
        frames += batch.numel()
        done = batch["next", "done"].squeeze(-1)
        returns.append(batch["next", "episode_reward"].squeeze(-1)[done])
        accuracy, fossil_count = final_stats(batch["next", "observation"][done], env.cfg.n_slots)
        accuracies.append(accuracy)
        fossils.append(fossil_count)
        op_counts += torch.bincount(batch["action", "op"].flatten().cpu(), minlength=len(Op))
    seconds = time.perf_counter() - start
    collector.shutdown()
    returns_t, acc_t, fossils_t = torch.cat(returns), torch.cat(accuracies), torch.cat(fossils)
    n = returns_t.numel()

    def mean(x: torch.Tensor) -> float:
        return float(x.mean()) if x.numel() else float("nan")

    return RolloutStats(
        frames=frames,
        seconds=seconds,
        mean_return=mean(returns_t),
        episodes=n,
        mean_final_accuracy=mean(acc_t),
        fossils_per_episode=mean(fossils_t),
        op_counts={op.name: int(c) for op, c in zip(Op, op_counts)},
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        n_envs=args.n_envs,
        n_slots=args.slots,
        topology=args.topology,
        max_epochs=args.max_epochs,
        gate_mode=args.gate_mode,
        reward_mode=args.reward_mode,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        threads=args.threads,
        validate_actions=not args.no_validate,
    )


def add_engine_args(parser: argparse.ArgumentParser, n_envs: int = 256, max_epochs: int = 150) -> None:
    parser.add_argument("--n-envs", type=int, default=n_envs)
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--topology", default="cnn", choices=["cnn", "transformer"])
    parser.add_argument("--max-epochs", type=int, default=max_epochs)
    parser.add_argument("--gate-mode", default="permissive", choices=["permissive", "strict"])
    parser.add_argument("--reward-mode", default="shaped", choices=["shaped", "sparse", "minimal", "simplified"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine step")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads for torch and the compiled step (0 = torch's default); 1 holds up next to other jobs",
    )
    parser.add_argument("--no-validate", action="store_true", help="skip per-step action checks (no host sync)")


def use_threads(threads: int) -> None:
    """Set torch's process-wide CPU thread count for a command (0 keeps torch's default). Each
    parallel op ends at a barrier that waits for its slowest thread, so with other jobs on the
    cores 2 threads can run ~10x slower than 1 (bench/RESULTS.md, "Threads under load"). An
    application may set this; the library never does."""
    if threads > 0:  # a negative count is reported by EngineConfig
        torch.set_num_threads(threads)


def format_stats(name: str, stats: RolloutStats) -> str:
    return (
        f"{name:10s} frames={stats.frames:>8d}  {stats.frames_per_second:>11,.0f} frames/s  "
        f"episodes={stats.episodes:>5d}  return={stats.mean_return:8.3f}  "
        f"final acc={stats.mean_final_accuracy:6.2f}%  fossils/ep={stats.fossils_per_episode:5.2f}"
    )


def collect_baseline(name: str, cfg: EngineConfig, episodes: int) -> RolloutStats:
    """``episodes`` episodes per env of the ``random`` or ``heuristic`` controller via Collector."""
    from esper_soa.baselines import HeuristicPolicy, RandomMaskedPolicy

    env = EsperEnv(cfg)
    policy = RandomMaskedPolicy(cfg.seed, cfg.device) if name == "random" else HeuristicPolicy(env)
    frames = cfg.n_envs * cfg.max_epochs
    return run_collector(env, policy, frames, frames * episodes)


def collect_script(name: str, argv: list[str] | None = None) -> None:
    """Entry point of ``scripts/collect_<name>.py``."""
    parser = argparse.ArgumentParser(description=f"Collector over EsperEnv with the {name} controller")
    add_engine_args(parser, n_envs=1024)
    parser.add_argument("--episodes", type=int, default=2)
    args = parser.parse_args(argv)
    use_threads(args.threads)
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
    ]
    frames = result.history[-1]["frames"] if result.history else 0
    print(f"\ntrained {len(result.history)} updates ({frames:,} frames) in {train_s:.0f} s"
          + (f"; logs and checkpoint in {result.log_dir}" if result.log_dir else ""))
    print(f"held-out env seeds {seeds} x {args.eval_envs} envs, {engine.max_epochs}-epoch episodes, "
          f"{engine.reward_mode} reward:")
    print(f"{'controller':15s} {'mean return':>12s} {'final acc %':>12s} {'fossils/ep':>11s} {'episodes':>9s}")
    for name, stats in rows:
        print(f"{name:15s} {stats.mean_return:12.3f} {stats.mean_final_accuracy:12.2f} "
              f"{stats.fossils_per_episode:11.3f} {stats.episodes:9d}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="esper-soa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="collector rollouts of the random and heuristic controllers")
    add_engine_args(p_demo, n_envs=256, max_epochs=150)
    p_demo.add_argument("--episodes", type=int, default=1)
    p_demo.set_defaults(func=demo)
    p_train = sub.add_parser("train", help="PPO on the surrogate (a few CPU minutes), compared with the baselines")
    add_engine_args(p_train, n_envs=256, max_epochs=150)  # ~4 min on a busy 2-core CPU
    p_train.add_argument("--updates", type=int, default=40)
    p_train.add_argument("--rollout-len", type=int, default=None, help="steps per env per update (default: max epochs)")
    p_train.add_argument("--collector", default="engine", choices=["engine", "torchrl"])
    p_train.add_argument("--hidden", type=int, default=128)
    p_train.add_argument("--lstm", action="store_true", help="LSTM after the MLP trunk")
    p_train.add_argument("--lr", type=float, default=3e-4)
    p_train.add_argument("--ppo-epochs", type=int, default=4)
    p_train.add_argument("--minibatches", type=int, default=4)
    p_train.add_argument("--log-dir", default=None, help="metrics.jsonl / metrics.csv / checkpoint.pt go here")
    p_train.add_argument("--checkpoint-every", type=int, default=10)
    p_train.add_argument("--resume", default=None, help="checkpoint to resume from")
    p_train.add_argument("--eval-seeds", default="1000,1001", help="held-out env seeds, comma-separated")
    p_train.add_argument("--eval-envs", type=int, default=128)
    p_train.set_defaults(func=train_command)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
