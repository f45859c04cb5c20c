"""Command line: ``esper-soa demo`` (collector rollouts of the baselines, throughput),
``esper-soa train`` (PPO, then a held-out comparison with the baselines), ``esper-soa eval`` (a
trained checkpoint next to the heuristic, random and wait controllers on held-out seeds, on any
backend: train on the surrogate, evaluate on the real hosts) and ``esper-soa plot`` (PNGs of a run).
``demo``, ``train`` and ``eval`` take ``--dynamics surrogate|hosts``, ``--preset`` and, for the hosts,
``--dataset``/``--data-path``.

``run_collector`` is the one place that drives ``torchrl.collectors.Collector`` over
``EsperEnv``; the scripts in ``scripts/`` and the trainer's evaluation reuse it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any

import torch

from esper_soa.core.config import REWARD_MODES, EngineConfig
from esper_soa.training.rollout import RolloutStats, collect_baseline

AUTO_FORWARD_GATES = ("g1", "g2", "g3")


def dynamics_config_from_args(args: argparse.Namespace) -> Any:
    """The backend config ``--dynamics``/``--preset``/``--dataset``/``--data-path`` select (None: the
    default surrogate). Raises ``ValueError`` with what was expected when the combination is invalid."""
    preset = args.preset or ("calibrated" if args.dynamics == "hosts" else "default")
    if args.dynamics == "surrogate":
        from esper_soa.dynamics.surrogate import SURROGATE_PRESETS

        if args.dataset is not None or args.data_path is not None:
            raise ValueError("--dataset/--data-path: expected only with --dynamics hosts (the surrogate has "
                             f"no dataset), got --dynamics surrogate --dataset {args.dataset} "
                             f"--data-path {args.data_path}")
        if preset not in SURROGATE_PRESETS:
            raise ValueError(f"--preset: expected one of {', '.join(SURROGATE_PRESETS)} for the surrogate, "
                             f"got {preset!r}")
        return None if preset == "default" else SURROGATE_PRESETS[preset]
    from dataclasses import replace
    from pathlib import Path

    from esper_soa.dynamics.hosts import HOSTS_PRESETS

    dataset = args.dataset or "digits"
    if dataset == "cifar10":
        if args.data_path is None:
            raise ValueError("--dataset cifar10: expected --data-path DIR, the unpacked 'cifar-10-batches-py' "
                             "folder (data_batch_1..5, test_batch); nothing is downloaded")
        if not Path(args.data_path).is_dir():
            raise ValueError(f"--data-path: expected a directory with CIFAR-10's python batches, got "
                             f"{args.data_path!r}, which is not a directory")
    elif args.data_path is not None:
        raise ValueError(f"--data-path: expected only with --dataset cifar10 (digits ships with scikit-learn), "
                         f"got --dataset {dataset} --data-path {args.data_path}")
    if preset not in HOSTS_PRESETS:
        raise ValueError(f"--preset: expected one of {', '.join(HOSTS_PRESETS)} for the hosts, got {preset!r}")
    return replace(HOSTS_PRESETS[preset], dataset=dataset, data_path=args.data_path)


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
        dynamics=args.dynamics,
        dynamics_config=dynamics_config_from_args(args),
        compile=args.compile,
        threads=args.threads,
        validate_actions=not args.no_validate,
    )


INHERITED = ("slots", "topology", "max_epochs", "gate_mode", "reward_mode")  # eval: from the checkpoint


def add_engine_args(
    parser: argparse.ArgumentParser, n_envs: int = 256, max_epochs: int = 150, inherit: bool = False
) -> None:
    """Engine and backend flags. ``inherit``: the :data:`INHERITED` ones default to None (filled
    from a checkpoint's engine by ``eval``, else from these defaults)."""
    def default(value: object) -> object:
        return None if inherit else value

    parser.add_argument("--n-envs", type=int, default=n_envs)
    parser.add_argument("--slots", type=int, default=default(3))
    parser.add_argument("--topology", default=default("cnn"), choices=["cnn", "transformer"])
    parser.add_argument("--max-epochs", type=int, default=default(max_epochs))
    parser.add_argument("--gate-mode", default=default("permissive"), choices=["permissive", "strict"])
    parser.add_argument(
        "--auto-forward", type=parse_auto_forward, default=",".join(AUTO_FORWARD_GATES), metavar="GATES",
        help="gates passed without an ADVANCE (comma-separated g1,g2,g3 or 'none'; default: all three, as "
             "the original ships; with all three ADVANCE is masked off)",
    )
    parser.add_argument("--reward-mode", default=default("committed"), choices=list(REWARD_MODES))
    parser.add_argument("--dynamics", default="surrogate", choices=["surrogate", "hosts"],
                        help="host dynamics: the analytic surrogate or real batched CNN hosts")
    parser.add_argument("--dataset", default=None, choices=["digits", "cifar10"],
                        help="--dynamics hosts: the task (default digits, from scikit-learn)")
    parser.add_argument("--data-path", default=None, help="--dataset cifar10: the cifar-10-batches-py folder")
    parser.add_argument("--preset", default=None, choices=["default", "calibrated"],
                        help="backend constants: 'calibrated' = the narrow hosts where seeds matter / the "
                             "surrogate fitted to them (docs/CALIBRATION.md); default: 'default' for the "
                             "surrogate, 'calibrated' for the hosts")
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
        f"episodes={stats.episodes:>5d}  return={stats.mean_return:8.3f}  J={stats.j_final:6.3f}  "
        f"final acc={stats.mean_final_accuracy:6.2f}%  committed acc={stats.committed_accuracy:6.2f}%  "
        f"fossils/ep={stats.fossils_per_episode:5.2f}"
    )


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
    """PPO on the chosen dynamics, then the held-out table (``evaluation.compare``) and the run's plots.
    Under ``torchrun`` each process is one rank of a data-parallel run (docs/DISTRIBUTED.md): rank 0
    prints, logs and writes; the held-out envs are split over the ranks too."""
    from dataclasses import replace

    from esper_soa.training.distributed import Comm, init_from_env, launched_by_torchrun
    from esper_soa.training.evaluation import compare, gather_results
    from esper_soa.training.train import TrainConfig, train

    comm = init_from_env(args.device) if launched_by_torchrun() else Comm()

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
    result = train(cfg, resume=args.resume, comm=comm)
    train_s = time.perf_counter() - start
    seeds = [int(s) for s in args.eval_seeds.split(",")]
    held_out = replace(engine, n_envs=args.eval_envs, compile=False)
    rows = gather_results(compare(result.model, comm.shard_engine(held_out), seeds), comm)
    comm.close()
    if not comm.main:
        return
    frames = result.history[-1]["frames"] if result.history else 0
    print(f"\ntrained {len(result.history)} updates ({frames:,} frames) in {train_s:.0f} s"
          + (f" on {comm.world} ranks" if comm.world > 1 else "")
          + (f"; logs and checkpoint in {result.log_dir}" if result.log_dir else ""))
    print_comparison(rows, held_out, seeds, result.log_dir / "eval.json" if result.log_dir else None)
    if result.log_dir is not None and importlib.util.find_spec("matplotlib") is not None:
        plot_command(argparse.Namespace(run=str(result.log_dir), envs=4, seed=seeds[0]))


def print_comparison(rows: list, cfg: EngineConfig, seeds: list[int], json_path: Any = None) -> None:
    """The held-out table of ``train`` and ``eval`` (and its JSON next to the run, if given)."""
    import json

    from esper_soa.training.evaluation import format_table

    gates = ",".join(g for g, on in zip(AUTO_FORWARD_GATES, (cfg.auto_forward_g1, cfg.auto_forward_g2,
                                                              cfg.auto_forward_g3)) if on) or "none"
    print(f"held-out env seeds {seeds} x {cfg.n_envs} envs, {cfg.max_epochs}-epoch episodes, "
          f"{cfg.dynamics} dynamics, {cfg.reward_mode} reward, auto-forward {gates} "
          f"(mean ± standard error over episodes):")
    print(format_table(rows))
    if json_path is not None:
        payload = {"engine": {"dynamics": cfg.dynamics, "n_envs": cfg.n_envs, "max_epochs": cfg.max_epochs,
                              "reward_mode": cfg.reward_mode, "n_slots": cfg.n_slots, "seeds": seeds},
                   "rows": {r.name: r.summary() for r in rows}}
        with open(json_path, "w") as fh:
            json.dump(payload, fh, indent=1)


def eval_command(args: argparse.Namespace) -> None:
    """A checkpoint's policy (optional) and the baselines on held-out seeds, on any backend."""
    from esper_soa.training.evaluation import compare, load_checkpoint_model

    model, trained = (None, None)
    if args.checkpoint is not None:
        model, trained = load_checkpoint_model(args.checkpoint, args.device)
    base = trained.engine if trained is not None else EngineConfig()
    for name in INHERITED:
        if getattr(args, name) is None:
            setattr(args, name, getattr(base, "n_slots" if name == "slots" else name))
    if args.slots != base.n_slots and trained is not None:
        raise ValueError(f"--slots: the checkpoint's policy was trained with {base.n_slots} slots "
                         f"(its observation size), got --slots {args.slots}")
    cfg = engine_config_from_args(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    print_comparison(compare(model, cfg, seeds, args.baselines), cfg, seeds, args.json)


def plot_command(args: argparse.Namespace) -> None:
    """PNGs of a run directory: learning curves and a lifecycle swimlane (``esper_soa.training.plots``)."""
    from esper_soa.training.plots import plot_run

    for path in plot_run(args.run, n_envs=args.envs, seed=args.seed):
        print(f"wrote {path}")


def baseline_list(text: str) -> list[str]:
    """``--baselines``: comma-separated names from ``evaluation.BASELINES`` (may be empty)."""
    from esper_soa.training.evaluation import BASELINES

    names = [b for b in text.split(",") if b]
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(BASELINES)}, got {', '.join(bad)}")
    return names


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
    p_train.add_argument("--log-dir", default=None, help="metrics (TorchRL CSV/TensorBoard), checkpoint.pt, eval.json and plots go here")
    p_train.add_argument("--checkpoint-every", type=int, default=10)
    p_train.add_argument("--resume", default=None, help="checkpoint to resume from")
    p_train.add_argument("--eval-seeds", default="1000,1001", help="held-out env seeds, comma-separated")
    p_train.add_argument("--eval-envs", type=int, default=128)
    p_train.set_defaults(func=train_command)
    p_eval = sub.add_parser("eval", help="a checkpoint next to the heuristic, random and wait controllers")
    p_eval.add_argument("--checkpoint", default=None, help="RUN/checkpoint.pt (omit: baselines only)")
    add_engine_args(p_eval, n_envs=32, inherit=True)
    p_eval.add_argument("--seeds", default="1000,1001", help="held-out env seeds, comma-separated")
    p_eval.add_argument("--baselines", type=baseline_list, default="heuristic,random,wait",
                        help="comma-separated, may be empty")
    p_eval.add_argument("--json", default=None, help="also write the table as JSON here")
    p_eval.set_defaults(func=eval_command)
    p_plot = sub.add_parser("plot", help="PNGs of a run: learning curves and a lifecycle swimlane")
    p_plot.add_argument("run", help="the --log-dir of 'esper-soa train'")
    p_plot.add_argument("--envs", type=int, default=4, help="envs in the swimlane")
    p_plot.add_argument("--seed", type=int, default=1000, help="held-out engine seed of the swimlane episode")
    p_plot.set_defaults(func=plot_command)
    args = parser.parse_args(argv)
    if hasattr(args, "dynamics"):
        try:  # bad backend flags: one clear line before any work, not a traceback
            dynamics_config_from_args(args)
        except ValueError as exc:
            parser.error(str(exc))
    if getattr(args, "checkpoint", None) is not None and not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint: expected RUN/checkpoint.pt written by 'esper-soa train --log-dir RUN', "
                     f"got {args.checkpoint!r}, which is not a file")
    use_threads(getattr(args, "threads", 1))  # commands without engine flags (plot) run on one thread
    args.func(args)


if __name__ == "__main__":
    main()
