"""Throughput report on one device (GPU when lent, CPU otherwise), every figure from one run.

The pytest-benchmark gates in this folder are sized for the 2-core CI CPU; this script measures
the same hot paths on any ``--device`` with wall-clock timing around device synchronisation:

* engine: the full step (surrogate + reward + transitions), eager and compiled, at several E,
  plus the per-env reference loop at the smallest E on this machine's CPU (the ratio's "before");
* env: ``EsperEnv.step`` over ``Engine.step`` (wrapper overhead) and a TorchRL ``Collector``
  driving the random masked policy;
* hosts: one host epoch of the batched real-hosts backend vs the per-env loop (issue 6); on an
  accelerator this is the hosts gate: >= ``HOSTS_GPU_MIN_SPEEDUP`` at E = 32 (``gate_passed`` in
  the report; the CPU gate is ``bench/test_bench_hosts.py``'s, at E = 128);
* train: PPO end to end (collect + GAE + update) with the compiled engine.

Each section is guarded: a failure is reported and the next section still runs. Results go to
stdout as they come and, with ``--out DIR``, to ``DIR/device_report.json``.

Run: ``python -m bench.device_report --device cuda --out /tmp/report``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.conftest import reference_round
from bench.test_bench_engine import warm_engine
from esper_soa.core.config import EngineConfig
from esper_soa.core.masks import sample_masked_action
from esper_soa.env.engine import Engine


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, rounds: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of one call, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def engine_section(device: torch.device, sizes: list[int], rounds: int) -> dict:
    rows = {}
    for n_envs in sizes:
        for variant in ("eager", "compiled"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            try:
                engine, actions = warm_engine(n_envs, variant == "compiled", str(device))
            except Exception as exc:  # keep the other variant's figures
                traceback.print_exc()
                rows[f"{variant}@{n_envs}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
            warm_s = time.perf_counter() - t0
            it = iter(range(10**9))
            sec = time_calls(lambda: engine.step(actions[next(it) % 8]), device, rounds)
            row = {"step_ms": 1e3 * sec, "env_steps_per_s": n_envs / sec, "warmup_s": warm_s}
            if device.type == "cuda":
                row["peak_gpu_bytes_per_env"] = torch.cuda.max_memory_allocated(device) / n_envs
            rows[f"{variant}@{n_envs}"] = row
            print(f"engine {variant:8s} E={n_envs:8d}: {row['step_ms']:8.3f} ms  {row['env_steps_per_s']:14,.0f} env-steps/s"
                  f"  (warm-up {warm_s:.0f} s)", flush=True)
            del engine
    # the "before": the per-env reference loop on this machine's CPU, at the smallest size
    n_envs = sizes[0]
    engine, actions = warm_engine(n_envs, compile=False)
    metrics, _ = engine.dynamics.advance(engine.lifecycle_state, engine.aux)
    run, setup = reference_round(engine.cfg, engine.lifecycle_state, actions[0], metrics)
    times = []
    for _ in range(6):  # as the benches: each round from the same state, GC on, mean of 6
        setup()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    sec = sum(times) / len(times)
    rows[f"reference@{n_envs}"] = {"step_ms": 1e3 * sec, "env_steps_per_s": n_envs / sec}
    print(f"reference (CPU loop) E={n_envs}: {1e3 * sec:.1f} ms", flush=True)
    for variant in ("eager", "compiled"):
        if "step_ms" in rows[f"{variant}@{n_envs}"]:
            ratio = sec / (rows[f"{variant}@{n_envs}"]["step_ms"] / 1e3)
            rows[f"{variant}_over_reference@{n_envs}"] = ratio
            print(f"{variant}/reference at E={n_envs}: {ratio:.0f}x", flush=True)
    return rows


def parity_section(device: torch.device, n_envs: int, steps: int) -> dict:
    """Same actions on the CPU eager engine, the eager engine on ``device`` and the compiled one:
    how many slot stages differ and how far the observations drift, per step."""
    cpu = torch.device("cpu")
    engines = {
        "cpu_eager": Engine(EngineConfig(n_envs=n_envs, compile=False, validate_actions=False)),
        "eager": Engine(EngineConfig(n_envs=n_envs, compile=False, validate_actions=False, device=str(device))),
        "compiled": Engine(EngineConfig(n_envs=n_envs, compile=True, validate_actions=False, device=str(device))),
    }
    outs = {k: e.reset() for k, e in engines.items()}
    generator = torch.Generator().manual_seed(0)
    worst = {"stage_mismatch_vs_cpu": 0, "stage_mismatch_compiled_vs_eager": 0,
             "obs_max_abs_vs_cpu": 0.0, "obs_max_abs_compiled_vs_eager": 0.0}
    for _ in range(steps):
        action = sample_masked_action(engines["cpu_eager"].masks, generator)
        outs = {k: e.step(action.to(e.device)) for k, e in engines.items()}
        stage = {k: e.state["slots", "stage"].to(cpu) for k, e in engines.items()}
        obs = {k: o["observation"].to(cpu) for k, o in outs.items()}
        worst["stage_mismatch_vs_cpu"] = max(worst["stage_mismatch_vs_cpu"], int((stage["eager"] != stage["cpu_eager"]).sum()))
        worst["stage_mismatch_compiled_vs_eager"] = max(
            worst["stage_mismatch_compiled_vs_eager"], int((stage["compiled"] != stage["eager"]).sum()))
        worst["obs_max_abs_vs_cpu"] = max(worst["obs_max_abs_vs_cpu"], float((obs["eager"] - obs["cpu_eager"]).abs().max()))
        worst["obs_max_abs_compiled_vs_eager"] = max(
            worst["obs_max_abs_compiled_vs_eager"], float((obs["compiled"] - obs["eager"]).abs().max()))
    print(f"parity over {steps} steps, E={n_envs} x 3 slots: {worst}", flush=True)
    return worst


def env_section(device: torch.device, n_envs: int, rounds: int) -> dict:
    from esper_soa.agents.baselines import RandomMaskedPolicy
    from esper_soa.env.esper_env import EsperEnv, action_td
    from esper_soa.training.rollout import run_collector

    env = EsperEnv(EngineConfig(n_envs=n_envs, compile=True, validate_actions=False, device=str(device)))
    env.reset()
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(5):
        env.engine.step(sample_masked_action(env.engine.masks, generator))
    actions = [sample_masked_action(env.engine.masks, generator) for _ in range(8)]
    tds = [action_td(a, [n_envs], device) for a in actions]
    it = iter(range(10**9))
    t_engine = time_calls(lambda: env.engine.step(actions[next(it) % 8]), device, rounds)
    t_env = time_calls(lambda: env.step(tds[next(it) % 8]), device, rounds)
    stats = run_collector(env, RandomMaskedPolicy(0), n_envs * 20, n_envs * 60)
    rows = {
        f"engine_step_ms@{n_envs}": 1e3 * t_engine,
        f"env_step_ms@{n_envs}": 1e3 * t_env,
        "env_over_engine": t_env / t_engine,
        f"collector_random_frames_per_s@{n_envs}": stats.frames_per_second,
    }
    print(f"env E={n_envs}: EsperEnv.step {1e3 * t_env:.3f} ms vs Engine.step {1e3 * t_engine:.3f} ms "
          f"(x{t_env / t_engine:.2f}); Collector random policy {stats.frames_per_second:,.0f} frames/s", flush=True)
    return rows


HOSTS_GPU_GATE_ENVS = 32
HOSTS_GPU_MIN_SPEEDUP = 5.0


def hosts_section(device: torch.device, sizes: list[int], rounds: int) -> dict:
    from bench.test_bench_hosts import per_env_loop, setup

    rows: dict = {}
    for n_envs in sizes:
        dyn, state, aux = setup(n_envs, device=str(device))
        loop = per_env_loop(dyn, state, aux)
        t_batched = time_calls(lambda: dyn.advance(state, aux), device, rounds)
        t_loop = time_calls(loop, device, max(2, rounds // 2), warmup=1)
        rows[f"{n_envs}"] = {"batched_epoch_ms": 1e3 * t_batched, "loop_epoch_ms": 1e3 * t_loop,
                             "speedup": t_loop / t_batched, "batched_env_epochs_per_s": n_envs / t_batched}
        print(f"hosts E={n_envs}: batched {1e3 * t_batched:.1f} ms, per-env loop {1e3 * t_loop:.1f} ms, "
              f"speedup {t_loop / t_batched:.1f}x", flush=True)
    gate = rows.get(f"{HOSTS_GPU_GATE_ENVS}")
    if device.type != "cpu" and gate is not None:
        rows["gate"] = {"n_envs": HOSTS_GPU_GATE_ENVS, "min_speedup": HOSTS_GPU_MIN_SPEEDUP,
                        "gate_passed": gate["speedup"] >= HOSTS_GPU_MIN_SPEEDUP}
        print(f"hosts gate (E={HOSTS_GPU_GATE_ENVS}, >= {HOSTS_GPU_MIN_SPEEDUP}x): "
              f"{'PASS' if rows['gate']['gate_passed'] else 'FAIL'}", flush=True)
    return rows


def train_section(device: torch.device, n_envs: int, updates: int) -> dict:
    from esper_soa.training.train import TrainConfig, Trainer

    engine = EngineConfig(n_envs=n_envs, max_epochs=150, compile=True, validate_actions=False, device=str(device))
    trainer = Trainer(TrainConfig(engine=engine, rollout_len=32, target_kl=None, progress=False, updates=10**6))
    for _ in range(2):
        trainer.step()
    frames = n_envs * 32
    sec = time_calls(trainer.step, device, updates, warmup=0)
    print(f"train E={n_envs}: {frames / sec:,.0f} env-steps/s end to end (compiled engine)", flush=True)
    return {f"env_steps_per_s@{n_envs}": frames / sec, "update_s": sec}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="4096,65536,262144,1048576", help="engine E values (first: reference ratio)")
    p.add_argument("--host-sizes", default="8,32,128")
    p.add_argument("--env-size", type=int, default=65536)
    p.add_argument("--train-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--sections", default="engine,parity,env,hosts,train")
    p.add_argument("--out", default=None)
    p.add_argument("--dynamic", action="store_true",
                   help="compile with a dynamic batch size from the start: one compile serves every E")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.dynamic:
        torch._dynamo.config.assume_static_by_default = False
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dynamic": args.dynamic}
    print(report, flush=True)
    sections = {
        "engine": lambda: engine_section(device, [int(x) for x in args.sizes.split(",")], args.rounds),
        "parity": lambda: parity_section(device, 1024, 40),
        "env": lambda: env_section(device, args.env_size, args.rounds),
        "hosts": lambda: hosts_section(device, [int(x) for x in args.host_sizes.split(",")], max(4, args.rounds // 4)),
        "train": lambda: train_section(device, args.train_size, 3),
    }
    out = Path(args.out) if args.out else None
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            report[name] = sections[name]()
        except Exception as exc:  # report and go on: one broken section must not cost the others
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[f"{name}_section_s"] = time.perf_counter() - t0
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "device_report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
