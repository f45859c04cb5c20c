"""Issue 15: data-parallel training throughput (collect + GAE + PPO update, env-steps/s of the
whole run) with 1 and 2 ranks at the same total envs (docs/DISTRIBUTED.md).

Run: ``pytest bench/test_bench_distributed.py -s``. Each variant is its own process group
(``torch.multiprocessing.spawn``, ``gloo`` on CPU / ``nccl`` on CUDA), so the 1-rank figure
carries the same DDP and all-reduce machinery as the 2-rank one. Each rank times ``UPDATES``
updates after ``WARMUP`` untimed ones (the compiled step, when on, is built by then), between
barriers; rank 0 reports. Knobs: ``ESPER_BENCH_DEVICE`` (``cpu``, or ``cuda``: rank r on
``cuda:r``), ``ESPER_BENCH_RANKS`` (``1,2``; e.g. ``1,2,4,8`` on a GPU node), ``ESPER_BENCH_ENVS``
(total envs, default 512), ``ESPER_BENCH_COMPILE`` (``1``: compiled engine), ``ESPER_BENCH_THREADS``
(per rank, default 1). No speedup is asserted: on a 2-core machine shared with other jobs two
ranks compete for the same cores (bench/RESULTS.md says what was measured and why).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.conftest import require
from esper_soa.core.config import EngineConfig
from esper_soa.training.distributed import ProcessGroupComm
from esper_soa.training.train import TrainConfig, Trainer

DEVICE = os.environ.get("ESPER_BENCH_DEVICE", "cpu")
RANKS = tuple(int(r) for r in os.environ.get("ESPER_BENCH_RANKS", "1,2").split(","))
N_ENVS = int(os.environ.get("ESPER_BENCH_ENVS", "512"))
COMPILE = os.environ.get("ESPER_BENCH_COMPILE", "0") == "1"
THREADS = int(os.environ.get("ESPER_BENCH_THREADS", "1"))
ROLLOUT, MAX_EPOCHS, WARMUP, UPDATES = 32, 150, 2, 4


def _config() -> TrainConfig:
    engine = EngineConfig(n_envs=N_ENVS, max_epochs=MAX_EPOCHS, compile=COMPILE, device=DEVICE,
                          validate_actions=False)
    return TrainConfig(engine=engine, rollout_len=ROLLOUT, target_kl=None, progress=False, updates=10**6)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(THREADS)
    cuda = torch.device(DEVICE).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        comm = ProcessGroupComm()
        trainer = Trainer(_config(), comm=comm)
        for _ in range(WARMUP):
            trainer.step()
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(UPDATES):
            trainer.step()
        comm.barrier()
        seconds = (time.perf_counter() - t0) / UPDATES
        if comm.main:
            Path(out).write_text(repr(seconds))
    finally:
        dist.destroy_process_group()


def _seconds_per_update(world: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds"
        mp.spawn(_worker, args=(world, port, str(out)), nprocs=world)
        return float(out.read_text())


@pytest.mark.parametrize("world", RANKS)
def test_train_ranks(benchmark, results, world: int) -> None:
    seconds = benchmark.pedantic(_seconds_per_update, args=(world,), rounds=1, iterations=1)
    results[(world,)] = seconds
    frames = N_ENVS * ROLLOUT
    benchmark.extra_info.update(ranks=world, env_steps_per_s=frames / seconds, n_envs=N_ENVS, device=DEVICE,
                                compile=COMPILE, threads_per_rank=THREADS)
    print(f"{world} rank(s): {frames / seconds:,.0f} env-steps/s ({seconds:.2f} s per update of {frames} frames, "
          f"{N_ENVS} envs in all, {DEVICE})")


def test_scaling(benchmark, results) -> None:
    require(results, *[(w,) for w in RANKS])
    base = results[(RANKS[0],)]
    ratios = {w: base / results[(w,)] for w in RANKS}
    benchmark.extra_info.update({f"speedup_{w}_over_{RANKS[0]}": r for w, r in ratios.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print("scaling: " + ", ".join(f"{w} ranks {r:.2f}x" for w, r in ratios.items()))
